"""Autograd for every op, and the functional API users call.

This is the only module that defines ``torch.autograd.Function``s. Each op checks its
arguments (raising ``ValueError``/``TypeError`` that name the argument), asks ``backend``
which back end runs it, and calls a launcher in ``kernels/`` or the CPU path.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------
# Block-sparse products: sdd, dsd, dds
# ---------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------
# Permutes: padded_gather / padded_scatter, gather / scatter
# ---------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------
# Activations on sparse blocks (elementwise on SparseMatrix.data)
# ---------------------------------------------------------------------------------------
