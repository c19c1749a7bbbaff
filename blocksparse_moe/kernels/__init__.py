"""The Triton back end: one kernel family per file, each launcher beside its kernel.

Exposes the same named functions as ``cpu/`` (see ``backend.Implementation``); the ops reach
it only through ``backend.impl``. It runs CUDA tensors, and CPU tensors under
``TRITON_INTERPRET=1`` (Triton's interpreter: how CI tests the kernels without a GPU).
Importing it compiles nothing: kernels are compiled, and autotuned, on first launch.
"""

from .activation import glu_backward, glu_forward
from .experts import experts_backward, experts_forward, experts_forward_fake
from .experts_fp8 import experts_forward_fp8
from .dds import dds
from .dsd import dsd
from .permute import gather, invert_rows, scatter, scatter_wgrad
from .sdd import sdd

__all__ = ["dds", "dsd", "experts_backward", "experts_forward", "experts_forward_fake", "experts_forward_fp8", "gather", "glu_backward", "glu_forward", "invert_rows", "scatter", "scatter_wgrad", "sdd"]
