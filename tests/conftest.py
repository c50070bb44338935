import os

import pytest
import torch

# Keep the suite deterministic and quiet on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))

try:
    from hypothesis import settings

    settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
    settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
