"""``python tests/train/run_cli.py ARGS``: the convzoo CLI with the tiny test model registered.

Used by the tests that need a separate process (torchrun, kill-and-resume).

With ``CONVZOO_TEST_STOP_AT=EPOCH,STEP,PATH`` in the environment, training writes the file
PATH right after the optimizer step STEP (counted from the start of the run) of epoch EPOCH
(0-based), then waits to be killed: the kill-and-resume test kills the process at a known
point in the middle of an epoch.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny_model  # noqa: E402

from convzoo.cli import main  # noqa: E402
from convzoo.models import register_model  # noqa: E402
from convzoo.train import loop  # noqa: E402

register_model(tiny_model.tiny_test_net)


def _stop_at(epoch: int, step: int, marker: str) -> None:
    original = loop.Trainer._optimizer_step

    def step_then_wait(self):
        original(self)
        if self.epoch == epoch and self.step == step:
            with open(marker, "w") as handle:
                handle.write(f"{epoch},{step}\n")
            while True:
                time.sleep(1)

    loop.Trainer._optimizer_step = step_then_wait


if __name__ == "__main__":
    if os.environ.get("CONVZOO_TEST_STOP_AT"):
        epoch, step, marker = os.environ["CONVZOO_TEST_STOP_AT"].split(",", 2)
        _stop_at(int(epoch), int(step), marker)
    raise SystemExit(main(sys.argv[1:]))
