"""``python tests/train/run_until_step.py MARKER STEP ARGS``: the convzoo CLI, except that after
optimizer step STEP it writes the file MARKER and then waits to be killed.

The kill-and-resume tests kill this process once MARKER exists: always at the same point of
training, so the test does not depend on timing.
"""
import sys
import time

from convzoo.cli import main
from convzoo.train import loop

marker, stop_at = sys.argv[1], int(sys.argv[2])
_original = loop.Trainer._optimizer_step


def _step_then_wait(self):
    _original(self)
    if self.step == stop_at:
        with open(marker, "w") as handle:
            handle.write(f"epoch {self.epoch} step {self.step}\n")
        time.sleep(600)


loop.Trainer._optimizer_step = _step_then_wait

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[3:]))
