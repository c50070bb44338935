"""``python tests/train/run_cli.py ARGS``: the convzoo CLI with the tiny test model registered.

Used by the tests that need a separate process (torchrun, kill-and-resume).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny_model  # noqa: E402

from convzoo.cli import main  # noqa: E402
from convzoo.models import register_model  # noqa: E402

register_model(tiny_model.tiny_test_net)

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
