"""The one place that decides which back end runs an op.

Three back ends exist:

* ``"triton"``      CUDA tensors: Triton kernels (products, permutes) and the CUDA ops of
                    ``blocksparse_moe._C`` (routing).
* ``"interpreter"`` CPU tensors while ``TRITON_INTERPRET=1`` is set: the very same Triton
                    kernels, run by Triton's interpreter. This is how CI tests the kernels.
* ``"cpu"``         CPU tensors otherwise: the C++ CPU ops of ``_C`` for routing and batched
                    torch matmuls over the blocks for the products.

Nothing else in the package inspects devices or environment variables to choose a path.
``TRITON_INTERPRET`` is read on every call (not at import) so tests can flip it; Triton
itself reads it when a kernel is first launched, so it should be set before that.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Literal, Optional

import torch

Backend = Literal["triton", "interpreter", "cpu"]


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")


_cpu_override: Optional[Backend] = None


@contextlib.contextmanager
def prefer_on_cpu(name: Backend) -> Iterator[None]:
    """Run CPU tensors on ``name`` ("cpu" or "interpreter") inside the block.

    Tests use it to run the CPU path and the interpreted Triton kernels in one process.
    The interpreter also needs ``TRITON_INTERPRET=1`` set before the kernels are imported,
    because ``triton.jit`` reads it when it decorates them.
    """
    global _cpu_override
    if name not in ("cpu", "interpreter"):
        raise ValueError(f"prefer_on_cpu: name must be 'cpu' or 'interpreter', got {name!r}")
    previous, _cpu_override = _cpu_override, name
    try:
        yield
    finally:
        _cpu_override = previous


def select(*tensors: Optional[torch.Tensor]) -> Backend:
    """The back end for an op whose tensor arguments are ``tensors``.

    Callers validate devices first (all arguments on one device); this only looks at the
    first tensor that is not ``None``.
    """
    device = next(t.device for t in tensors if t is not None)
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        if _cpu_override is not None:
            return _cpu_override
        return "interpreter" if interpreter_enabled() else "cpu"
    raise ValueError(f"blocksparse_moe: tensors on device '{device}' are not supported (cpu or cuda)")


def uses_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels run this call (on a GPU or in the interpreter)."""
    return select(*tensors) != "cpu"
