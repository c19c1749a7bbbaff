"""The functional API: autograd Functions and the public ops, one module per op family.

Modules mirror ``kernels/`` and ``cpu/``: ``products`` (sdd, dsd, dds), ``permute``
(gather/scatter, padded or not), ``activation`` (activations and GLUs on sparse blocks) and
``experts`` (the fused, sync-free expert path the layer runs). Each op checks its arguments
(``checks``), asks ``backend.impl`` for the implementation, and launches through a
``blocksparse_moe::`` custom op so that ``torch.compile`` traces it without a graph break.
This package is the only place that defines ``torch.autograd.Function``s.
"""

from .activation import ACTIVATIONS, canonical_activation, sparse_activation, sparse_glu, sparse_glu_packed
from .permute import gather, padded_gather, padded_scatter, scatter
from .products import dds, dsd, sdd

__all__ = ["ACTIVATIONS", "canonical_activation", "dds", "dsd", "gather", "padded_gather", "padded_scatter",
           "scatter", "sdd", "sparse_activation", "sparse_glu", "sparse_glu_packed"]
