"""blocksparse_moe: dropless Mixture-of-Experts on block-sparse products (MegaBlocks formulation)."""

from ._native import native_status
from .routing import Routing, route
from .topology import Topology, make_topology

__version__ = "0.1.0"

__all__ = ["Routing", "Topology", "make_topology", "native_status", "route", "__version__"]
