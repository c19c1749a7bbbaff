"""The CPU back end: the same named functions as ``kernels/`` (see ``backend.Implementation``).

This is what users get on CPU tensors when ``TRITON_INTERPRET`` is unset; the ops reach it
only through ``backend.impl``. It is a real CPU implementation (batched torch matmuls,
whatever the CPU does best), not a test double.
"""

from .activation import glu_backward, glu_forward
from .experts import experts_backward, experts_forward, experts_forward_fake, experts_forward_fp8
from .permute import gather, invert_rows, scatter, scatter_wgrad
from .products import dds, dsd, sdd

__all__ = ["dds", "dsd", "experts_backward", "experts_forward", "experts_forward_fake", "experts_forward_fp8", "gather", "glu_backward", "glu_forward", "invert_rows", "scatter", "scatter_wgrad", "sdd"]
