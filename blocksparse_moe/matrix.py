"""SparseMatrix: block data on a Topology, optionally read as its transpose.

``data[n]`` is the ``b x b`` block at block row ``topology.row_indices[n]`` and block column
``topology.column_indices[n]`` (row-major block order). ``transposed=True`` means the matrix
*is* the transpose of that one: same data and topology, shape swapped; the products then
read its blocks through ``column_indices_t`` / ``offsets_t`` / ``block_offsets_t`` and
transpose each block through strides, so ``.t()`` never moves data.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .topology import Topology

SPARSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class SparseMatrix:
    """A block-sparse ``M x N`` matrix: ``topology`` + ``data [nnz, b, b]`` (+ a transpose flag).

    ``data`` may require grad: the products in ``ops`` differentiate with respect to it.
    """

    __slots__ = ("topology", "data", "transposed")

    def __init__(self, topology: Topology, data: torch.Tensor, transposed: bool = False) -> None:
        if not isinstance(topology, Topology):
            raise TypeError(f"SparseMatrix: topology must be a Topology, got {type(topology).__name__}")
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"SparseMatrix: data must be a tensor, got {type(data).__name__}")
        if not isinstance(transposed, bool):
            raise TypeError(f"SparseMatrix: transposed must be a bool, got {type(transposed).__name__}")
        b = topology.block_size
        if tuple(data.shape) != (topology.nnz, b, b):
            raise ValueError(f"SparseMatrix: data has shape {tuple(data.shape)} but the topology needs "
                             f"(nnz={topology.nnz}, {b}, {b})")
        if data.dtype not in SPARSE_DTYPES:
            raise TypeError(f"SparseMatrix: data must be one of {SPARSE_DTYPES}, got {data.dtype}")
        if data.device != topology.device:
            raise ValueError(f"SparseMatrix: data is on {data.device} but the topology is on {topology.device}")
        self.topology = topology
        self.data = data
        self.transposed = transposed

    # -- sizes ---------------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int]:
        m, n = self.topology.shape
        return (n, m) if self.transposed else (m, n)

    @property
    def block_size(self) -> int:
        return self.topology.block_size

    @property
    def nnz(self) -> int:
        return self.topology.nnz

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    # -- views ---------------------------------------------------------------------------
    def t(self) -> "SparseMatrix":
        """The transpose: same data and topology, flag flipped (no copy)."""
        return SparseMatrix(self.topology, self.data, not self.transposed)

    @property
    def T(self) -> "SparseMatrix":  # noqa: N802 (torch's spelling)
        return self.t()

    def with_data(self, data: torch.Tensor) -> "SparseMatrix":
        """Same topology and transpose flag, other block values (checked like the constructor)."""
        return SparseMatrix(self.topology, data, self.transposed)

    def to_dense(self) -> torch.Tensor:
        """The ``shape`` dense tensor (zeros outside stored blocks); differentiable in ``data``.

        For a transposed matrix this is a transposed view of the dense original.
        """
        topo = self.topology
        b = topo.block_size
        m, n = topo.shape
        blocks = self.data.new_zeros(m // b, n // b, b, b)
        blocks = blocks.index_put((topo.row_indices.long(), topo.column_indices.long()), self.data)
        dense = blocks.permute(0, 2, 1, 3).reshape(m, n)
        return dense.t() if self.transposed else dense

    def __repr__(self) -> str:
        return (f"SparseMatrix(shape={self.shape}, block_size={self.block_size}, nnz={self.nnz}, "
                f"dtype={self.dtype}, device={self.device}, transposed={self.transposed})")
