"""``python -m convzoo ...`` (also what ``torchrun -m convzoo ...`` runs)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
