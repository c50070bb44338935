"""Shared check for the torch.export tests of the ops and layers (importable because tests/conftest.py
puts this folder on sys.path)."""
from typing import List

import torch


def exported_call_targets(module: torch.nn.Module, *args: torch.Tensor) -> List[str]:
    """Export ``module`` on ``args`` with torch.export, check that the exported program gives the
    module's outputs, and return the names of the graph's call targets (e.g. "convzoo.dwconv2d.default")."""
    program = torch.export.export(module, args)
    torch.testing.assert_close(program.module()(*args), module(*args))
    return [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
