import os

# Triton kernels run on CPU tensors through Triton's interpreter when there is no GPU.
# The variable must be set before any @triton.jit kernel is defined.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

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


@pytest.fixture(scope="session")
def triton_device() -> torch.device:
    """Where the Triton kernel tests run: the GPU when there is one (compiled kernels), else the CPU
    (the same kernels under TRITON_INTERPRET=1).  References always run on the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
