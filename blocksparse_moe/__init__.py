"""blocksparse_moe: dropless Mixture-of-Experts on block-sparse products (MegaBlocks formulation).

Tokens are grouped by expert, each group is padded only to the next block, and the expert
MLPs run as block-sparse products (SDD, DSD, DDS) over a blocked CSR-COO topology. No token
is dropped and there is no capacity factor.

Importing the package starts nothing: the native extension is loaded, and Triton kernels are
compiled or autotuned, on first use.
"""

from .native import native_status
from . import fp8
from .matrix import SparseMatrix
from .moe import DenseMLP, DroplessMoE, MoEAux
from .ops.experts import expert_mlp
from .ops import (dds, dsd, gather, padded_gather, padded_scatter, scatter, sdd, sparse_activation, sparse_glu,
                  sparse_glu_packed)
from .router import Router, RouterOutput, load_balancing_loss, z_loss
from .routing import Routing, route
from .topology import Topology, make_topology
from .tuning import load_tuning, save_tuning
from .warmup import warmup

__version__ = "0.1.0"

__all__ = [
    "DenseMLP", "DroplessMoE", "MoEAux", "Router", "RouterOutput", "Routing", "SparseMatrix", "Topology",
    "dds", "dsd", "expert_mlp", "fp8", "gather", "load_balancing_loss", "load_tuning", "make_topology",
    "native_status", "padded_gather", "padded_scatter", "route", "save_tuning", "scatter", "sdd",
    "sparse_activation", "sparse_glu", "sparse_glu_packed", "warmup", "z_loss", "__version__",
]
