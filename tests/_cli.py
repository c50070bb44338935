"""What the end-to-end CLI tests share: running ``convzoo`` in-process and reading a training
run's files (importable: pytest puts this folder on sys.path)."""
import json
import os

import torch

from convzoo.cli import main


def run_cli(argv, capsys):
    """``convzoo ARGV`` in this process: (exit code, stdout, stderr)."""
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def read_metrics(output):
    """The per-epoch records of the run in ``output`` (its metrics.jsonl)."""
    with open(os.path.join(output, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def read_state(output):
    """The training checkpoint of the run in ``output``."""
    return torch.load(os.path.join(output, "checkpoint.pt"), map_location="cpu", weights_only=True)
