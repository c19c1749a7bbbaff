"""Layout helpers shared by the ops: when an operand needs a copy before a launcher sees it."""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false


def unit_stride_cols(t: torch.Tensor) -> bool:
    """Whether 2-D ``t`` has unit column stride (or at most one column, where it is moot).

    The width may be an unbacked size under torch.compile: asking ``shape[1] <= 1`` of it
    would need its value, so the stride is asked first and the width only if it can be
    decided (a copy otherwise, which is always correct).
    """
    return t.stride(1) == 1 or guard_or_false(t.shape[1] <= 1)


def with_unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D tensor with unit column stride: itself when it has one, else a copy.

    Incoming gradients can be expanded views (the gradient of ``.sum()`` has stride 0
    everywhere); the kernels address columns with stride 1, so those, and only those, are
    copied.
    """
    return t if t.dim() == 2 and unit_stride_cols(t) else t.contiguous()
