"""Test set-up shared by every file.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors: that needs
TRITON_INTERPRET=1 before triton decorates the kernels, so it is set here, before any test
module imports blocksparse_moe. The ``path`` fixture then runs a test on both back ends a
CPU machine has: the torch CPU path and the interpreted Triton kernels. On a GPU machine the
"triton" param runs on CUDA tensors instead.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (deselected by default; run with -m gpu)")
    config.addinivalue_line("markers", "slow: long-running CPU test")


def pytest_collection_modifyitems(config, items):
    # GPU tests run only when asked for with -m gpu (MegaBlocks' convention).
    if "gpu" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="GPU test: run with -m gpu on a CUDA machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", "triton"])
def path(request):
    """(device, backend context) for the torch CPU path and the Triton kernels."""
    from blocksparse_moe import backend

    if request.param == "cpu":
        with backend.prefer_on_cpu("cpu"):
            yield torch.device("cpu")
    elif torch.cuda.is_available():
        yield torch.device("cuda")
    else:
        with backend.prefer_on_cpu("interpreter"):
            yield torch.device("cpu")
