"""The one place that decides which back end runs an op.

Three back ends exist:

* ``"triton"``      CUDA tensors: Triton kernels (products, permutes) and the CUDA ops of
                    ``blocksparse_moe._C`` (routing).
* ``"interpreter"`` CPU tensors while ``TRITON_INTERPRET=1`` is set: the very same Triton
                    kernels, run by Triton's interpreter. This is how CI tests the kernels.
* ``"cpu"``         CPU tensors otherwise: the C++ CPU ops of ``_C`` for routing and batched
                    torch matmuls over the blocks for the products.

:func:`impl` returns the implementation for a call: the package ``kernels`` (Triton) or
``cpu``, which both provide the functions of :class:`Implementation`. Nothing else in the
package inspects devices or environment variables to choose a path.
``TRITON_INTERPRET`` is read on every call (not at import) so tests can flip it; Triton
itself reads it when a kernel is first launched, so it should be set before that.
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Iterator, List, Literal, Optional, Protocol, Tuple

import torch

from .interpreter import interpreter_enabled

Backend = Literal["triton", "interpreter", "cpu"]




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


def impl(*tensors: Optional[torch.Tensor]) -> ModuleType:
    """The implementation (an :class:`Implementation`) that runs an op on ``tensors``."""
    if select(*tensors) == "cpu":
        from . import cpu as module
    else:
        from . import kernels as module
    return module


def native_device(device: torch.device) -> Literal["cpu", "cuda"]:
    """Which build of the native routing ops runs on ``device``: the C++ CPU ops or the CUDA ops.

    Routing has no Triton kernels, so the interpreter plays no part: CPU tensors always run
    the CPU ops.
    """
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"blocksparse_moe: tensors on device '{device}' are not supported (cpu or cuda)")
    return "cuda" if device.type == "cuda" else "cpu"


def checks_on_device(t: torch.Tensor) -> bool:
    """Whether a check of ``t``'s values runs on the device (a GPU: ``torch._assert_async``,
    nothing read back, capturable in a CUDA graph) instead of on the host (CPU tensors: a
    ``ValueError``, reading host memory costs no synchronisation)."""
    return t.device.type == "cuda"


def mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in float32 for half-precision ``a`` and ``b`` (fp32 accumulation either way).

    CUDA's matmul writes a float32 result from bf16/fp16 operands directly; the CPU's has no
    such form, so there the operands are upcast first (temporaries, freed at once).
    """
    if a.device.type == "cuda" and _MM_OUT_DTYPE:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without mm(out_dtype=) for this dtype
            pass
    return a.float() @ b.float()


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


class Implementation(Protocol):
    """The functions both back ends (``kernels/`` and ``cpu/``) provide, with one signature.

    The ops have checked every user argument before calling these; implementations
    re-check only what would make them read or write out of bounds. ``meta`` stands for the
    six topology tensors in ``Topology`` field order (row_indices, column_indices, offsets,
    column_indices_t, offsets_t, block_offsets_t). Outputs are written completely.
    """

    def sdd(self, a: torch.Tensor, b: torch.Tensor, *meta_and_block_size, out: Optional[torch.Tensor] = None,
            a_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``data [nnz, b, b]`` of ``a @ b`` on the topology's blocks."""

    def dsd(self, data: torch.Tensor, b: torch.Tensor, *meta_and_transposed,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dense ``S @ b`` (``S^T @ b`` when transposed)."""

    def dds(self, a: torch.Tensor, data: torch.Tensor, *meta_and_transposed,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dense ``a @ S`` (``a @ S^T`` when transposed)."""

    def gather(self, x: torch.Tensor, row_slots: torch.Tensor, top_k: int, weights: Optional[torch.Tensor] = None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``out[r] = w[s] * x[s // top_k]`` for ``s = row_slots[r]``; zero rows where ``s == -1``."""

    def scatter(self, y: torch.Tensor, rows: torch.Tensor, top_k: int, weights: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``out[t] = sum_j w[t, j] * y[rows[t*k + j]]``, in a fixed order."""

    def scatter_wgrad(self, dout: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, top_k: int,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``dw[t, j] = <dout[t], y[rows[t*k + j]]>``."""

    def invert_rows(self, rows: torch.Tensor, num_rows: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``row_slots[rows[s]] = s``, -1 elsewhere."""

    def glu_forward(self, gate: torch.Tensor, up: Optional[torch.Tensor], act: int,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``act(gate) * up`` (``act(gate)`` without ``up``) on 2-D rows."""

    def glu_backward(self, dout: torch.Tensor, gate: torch.Tensor, up: Optional[torch.Tensor], act: int,
                     dgate: Optional[torch.Tensor] = None,
                     dup: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(dgate, dup)`` of :meth:`glu_forward`."""

    def experts_forward(self, x: torch.Tensor, expert_indices: torch.Tensor, weights: Optional[torch.Tensor],
                        w1: torch.Tensor, w2: torch.Tensor, b1: Optional[torch.Tensor], b2: Optional[torch.Tensor],
                        *, num_experts: int, act: str, glu: bool, block_size: int,
                        keep: bool = True) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The fused expert path: ``(out [T, H], saved)``; see ``ops/experts.py``. Without
        ``keep`` (no backward will run) the saved pre-activation has no rows."""

    def experts_forward_fake(self, x: torch.Tensor, expert_indices: torch.Tensor, weights: Optional[torch.Tensor],
                             w1: torch.Tensor, w2: torch.Tensor, b1: Optional[torch.Tensor],
                             b2: Optional[torch.Tensor], *, num_experts: int, act: str, glu: bool,
                             block_size: int, keep: bool = True) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Empty tensors of :meth:`experts_forward`'s shapes (for torch.compile's fake mode)."""

    def experts_forward_fp8(self, x: torch.Tensor, expert_indices: torch.Tensor, weights: Optional[torch.Tensor],
                            w1: torch.Tensor, w1_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                            b1: Optional[torch.Tensor], b2: Optional[torch.Tensor], *, num_experts: int, act: str,
                            glu: bool, block_size: int) -> torch.Tensor:
        """The fused expert path with float8_e4m3fn weights and float32 block scales
        (``blocksparse_moe/fp8.py``'s format): ``out [T, H]`` in x's dtype; forward only."""

    def experts_backward(self, dout: torch.Tensor, saved: List[torch.Tensor], x: torch.Tensor,
                         expert_indices: torch.Tensor, weights: Optional[torch.Tensor], w1: torch.Tensor,
                         w2: torch.Tensor, b1: Optional[torch.Tensor], b2: Optional[torch.Tensor], *,
                         num_experts: int, act: str, glu: bool, block_size: int,
                         needs_input_grad: Tuple[bool, ...]) -> Tuple[Optional[torch.Tensor], ...]:
        """Gradients of ``(x, weights, w1, w2, b1, b2)``."""
