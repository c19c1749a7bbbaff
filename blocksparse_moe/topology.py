"""The blocked CSR-COO description of a block-sparse matrix (the MegaBlocks layout).

A ``Topology`` describes which ``b x b`` blocks of an ``M x N`` matrix are stored, and in
what order. The data itself lives elsewhere (``SparseMatrix.data``, shape ``[nnz, b, b]``),
in row-major block order. The metadata, all int32 (int16 overflows on large layers):

    row_indices[nnz]         block row of each stored block (COO)
    column_indices[nnz]      block column of each stored block (CSR)
    offsets[M/b + 1]         CSR row pointers into the stored blocks
    column_indices_t[nnz]    block *row* of each block, listed in column-major order
    offsets_t[N/b + 1]       CSR pointers of the transpose (column pointers)
    block_offsets_t[nnz]     index into ``data`` of each block, listed in column-major order

The last three let the products read the transpose without moving any data.

For a dropless MoE the matrix is the hidden activation ``P x (E*F)``: block row ``r`` belongs
to expert ``e(r)`` and holds the ``F/b`` blocks of that expert's columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import native
from .library import custom_op
from .native.fallback import TOPOLOGY_FIELDS as _FIELDS
from .native.fallback import coo_fields

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)



def check_block_size(block_size: int, name: str = "block_size") -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{name} must be an int, got {type(block_size).__name__}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"{name} must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")


def block_size_for(ffn: int, name: str) -> int:
    """The largest supported block size dividing ``ffn``, the experts' inner width: what
    ``block_size=None`` means wherever a block size is asked for. ``name`` says where
    ``ffn`` came from, for the error."""
    block = next((b for b in sorted(SUPPORTED_BLOCK_SIZES, reverse=True) if ffn % b == 0), 0)
    if not block:
        raise ValueError(f"{name} = {ffn}, which no block size {SUPPORTED_BLOCK_SIZES} divides (pad the "
                         f"experts' inner width to a multiple of {min(SUPPORTED_BLOCK_SIZES)})")
    return block


def block_size_for_call(slots, num_experts: int, ffn: int, name: str) -> int:
    """The row padding ``b`` of one call of the fused expert path, from its shapes only: what
    ``block_size=None`` means there (``DroplessMoE``'s default, the transformers backend).

    At most ``min(E, T*k)`` experts hold rows, so each holds ``r = T*k / min(E, T*k)`` rows on
    average and pads fewer than ``b``. The rule takes the largest power of two ``b <= r/2``
    (so padding stays under about a quarter of the rows), at least 16 and at most the largest
    block size dividing ``ffn`` (:func:`block_size_for`; every smaller power of two divides
    it too). A decode step (a few rows per expert) gets 16, a prefill of thousands of tokens
    gets 64 or 128. The tile sizes of the kernels are chosen separately (their column tiles
    depend on ``ffn`` only). ``slots = T*k`` may be a ``torch.SymInt`` (torch.compile with a
    dynamic token count): the rule would guard on it, so such calls take the largest size.
    """
    largest = block_size_for(ffn, name)
    if not isinstance(slots, int) or isinstance(slots, bool):
        return largest
    rows = slots // max(1, min(num_experts, slots))
    block = min(SUPPORTED_BLOCK_SIZES)
    while block * 2 <= min(largest, rows // 2):
        block *= 2
    return block


@dataclass(frozen=True)
class Topology:
    """Blocked CSR-COO metadata of an ``M x N`` block-sparse matrix (see module docstring)."""

    row_indices: torch.Tensor
    column_indices: torch.Tensor
    offsets: torch.Tensor
    column_indices_t: torch.Tensor
    offsets_t: torch.Tensor
    block_offsets_t: torch.Tensor
    shape: Tuple[int, int]
    block_size: int

    def __post_init__(self) -> None:
        check_block_size(self.block_size)
        m, n = self.shape
        b = self.block_size
        if m < 0 or n < 0 or m % b or n % b:
            raise ValueError(f"Topology: shape {tuple(self.shape)} is not a non-negative multiple of block_size {b}")
        device = self.row_indices.device
        for name in _FIELDS:
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Topology: {name} must be a tensor, got {type(t).__name__}")
            if t.dtype != torch.int32:
                raise TypeError(f"Topology: {name} must be int32, got {t.dtype}")
            if t.dim() != 1 or not t.is_contiguous():
                raise ValueError(f"Topology: {name} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}")
            if t.device != device:
                raise ValueError(f"Topology: {name} is on {t.device} but row_indices is on {device}")
        nnz = self.row_indices.numel()
        for name in ("column_indices", "column_indices_t", "block_offsets_t"):
            if getattr(self, name).numel() != nnz:
                raise ValueError(f"Topology: {name} has {getattr(self, name).numel()} entries, expected nnz={nnz}")
        if self.offsets.numel() != m // b + 1:
            raise ValueError(f"Topology: offsets has {self.offsets.numel()} entries, expected {m // b + 1}")
        if self.offsets_t.numel() != n // b + 1:
            raise ValueError(f"Topology: offsets_t has {self.offsets_t.numel()} entries, expected {n // b + 1}")

    # -- sizes ---------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        """Number of stored blocks."""
        return self.row_indices.numel()

    @property
    def block_rows(self) -> int:
        return self.shape[0] // self.block_size

    @property
    def block_columns(self) -> int:
        return self.shape[1] // self.block_size

    @property
    def device(self) -> torch.device:
        return self.row_indices.device

    def to(self, device: torch.device | str) -> "Topology":
        return Topology(*(getattr(self, f).to(device) for f in _FIELDS), shape=self.shape, block_size=self.block_size)

    # -- views for tests -----------------------------------------------------------------
    def to_dense_mask(self) -> torch.Tensor:
        """``[M, N]`` bool tensor, True inside stored blocks. Built from the COO fields."""
        m, n = self.shape
        b = self.block_size
        blocks = torch.zeros(m // b, n // b, dtype=torch.bool, device=self.device)
        blocks[self.row_indices.long(), self.column_indices.long()] = True
        return blocks.repeat_interleave(b, 0).repeat_interleave(b, 1)

    def block_index_map(self) -> torch.Tensor:
        """``[M/b, N/b]`` int64 tensor: the ``data`` index of each stored block, -1 elsewhere."""
        b = self.block_size
        out = torch.full((self.shape[0] // b, self.shape[1] // b), -1, dtype=torch.int64, device=self.device)
        out[self.row_indices.long(), self.column_indices.long()] = torch.arange(self.nnz, device=self.device)
        return out

    # -- construction --------------------------------------------------------------------
    @staticmethod
    def from_block_coo(row_indices: torch.Tensor, column_indices: torch.Tensor, shape: Tuple[int, int],
                       block_size: int) -> "Topology":
        """Any block pattern from COO block coordinates (sorted here into row-major order).

        Used by tests to exercise the products on patterns routing never makes.
        """
        check_block_size(block_size)
        m, n = int(shape[0]), int(shape[1])
        if m % block_size or n % block_size:
            raise ValueError(f"from_block_coo: shape {(m, n)} is not a multiple of block_size {block_size}")
        rows = row_indices.to(torch.int64).flatten()
        cols = column_indices.to(torch.int64).flatten()
        if rows.numel() != cols.numel():
            raise ValueError(f"from_block_coo: {rows.numel()} row indices but {cols.numel()} column indices")
        if rows.numel() and (rows.min() < 0 or rows.max() >= m // block_size):
            raise ValueError(f"from_block_coo: row_indices out of range [0, {m // block_size})")
        if cols.numel() and (cols.min() < 0 or cols.max() >= n // block_size):
            raise ValueError(f"from_block_coo: column_indices out of range [0, {n // block_size})")
        key = rows * (n // block_size) + cols
        if torch.unique(key).numel() != key.numel():
            raise ValueError("from_block_coo: duplicate blocks")
        order = torch.argsort(key, stable=True)
        return Topology(**coo_fields(rows[order], cols[order], (m, n), block_size), shape=(m, n),
                        block_size=block_size)


def check_make_topology_args(padded_bins: torch.Tensor, num_experts: int, ffn_hidden_size: int,
                             block_size: int) -> None:
    """Argument checks shared by every back end of :func:`make_topology`."""
    check_block_size(block_size)
    for name, v in (("num_experts", num_experts), ("ffn_hidden_size", ffn_hidden_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"make_topology: {name} must be an int, got {type(v).__name__}")
    if num_experts < 1:
        raise ValueError(f"make_topology: num_experts must be >= 1, got {num_experts}")
    if ffn_hidden_size < 1 or ffn_hidden_size % block_size:
        raise ValueError(
            f"make_topology: ffn_hidden_size ({ffn_hidden_size}) must be a positive multiple of block_size ({block_size})")
    if not isinstance(padded_bins, torch.Tensor):
        raise TypeError(f"make_topology: padded_bins must be a tensor, got {type(padded_bins).__name__}")
    if padded_bins.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"make_topology: padded_bins must be int32 or int64, got {padded_bins.dtype}")
    if padded_bins.shape != (num_experts,):
        raise ValueError(f"make_topology: padded_bins has shape {tuple(padded_bins.shape)}, expected ({num_experts},)")
    if not padded_bins.is_contiguous():
        raise ValueError(f"make_topology: padded_bins must be contiguous, got stride {padded_bins.stride()}")
    if padded_bins.device.type not in ("cpu", "cuda"):
        raise ValueError(f"make_topology: padded_bins is on unsupported device {padded_bins.device}")


def _padded_block_rows_fake(padded_bins, block_size):
    return torch.library.get_ctx().new_dynamic_size()


@custom_op("padded_block_rows", _padded_block_rows_fake)
def padded_block_rows(padded_bins: torch.Tensor, block_size: int) -> int:
    """``P / block_size`` for ``P = padded_bins[-1]`` (one host read on a GPU).

    Under torch.compile this is an unbacked size; it counts block rows rather than rows so
    that the compiler knows ``P`` is a multiple of the block size.
    """
    p = int(padded_bins[-1]) if padded_bins.numel() else 0
    if p < 0 or p % block_size:
        raise ValueError(f"padded_block_rows: padded_bins[-1] = {p} is not a non-negative multiple of "
                         f"block_size {block_size}")
    return p // block_size


def _topology_fake(padded_bins, num_experts, ffn_hidden_size, block_size, padded_tokens):
    # make_topology passes P under compile (see there); a direct call without it gets an
    # unbacked row count (allowed with fullgraph=True).
    if padded_tokens is None:
        rows = torch.library.get_ctx().new_dynamic_size()
    else:
        rows = padded_tokens // block_size
    fb = ffn_hidden_size // block_size
    nnz = rows * fb
    sizes = (nnz, nnz, rows + 1, nnz, num_experts * fb + 1, nnz)  # _FIELDS order
    return tuple(padded_bins.new_empty(size, dtype=torch.int32) for size in sizes)


@custom_op("topology", _topology_fake)
def _topology(padded_bins: torch.Tensor, num_experts: int, ffn_hidden_size: int, block_size: int,
              padded_tokens: Optional[int]
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The six metadata tensors (``_FIELDS`` order) of :func:`make_topology`'s result.

    ``padded_tokens`` (``P``, or None) gives the fake its sizes; the native build reads and
    validates ``padded_bins`` itself, and a ``P`` that disagrees with it is an error.
    """
    fields, p = native.make_topology(padded_bins, num_experts, ffn_hidden_size, block_size)
    if padded_tokens is not None and p != padded_tokens:
        raise ValueError(f"make_topology: padded_tokens={padded_tokens} but padded_bins[-1] = {p}")
    return tuple(fields[name] for name in _FIELDS)


def make_topology(padded_bins: torch.Tensor, num_experts: int, ffn_hidden_size: int, block_size: int, *,
                  padded_tokens: Optional[int] = None) -> Topology:
    """The ``P x (E*F)`` topology of a dropless MoE's hidden activation.

    Args:
        padded_bins: ``[E]`` inclusive cumulative sum of each expert's token count rounded up
            to ``block_size`` (``Routing.padded_bins``). ``P = padded_bins[-1]``.
        num_experts: ``E``.
        ffn_hidden_size: ``F``, each expert's inner width; a multiple of ``block_size``.
        block_size: ``b``, one of 16, 32, 64, 128.
        padded_tokens: ``P`` when the caller knows it (``Routing.known_padded_tokens``);
            checked against ``padded_bins``. Under torch.compile ``P`` is a symbolic size,
            and passing the routing's keeps one ``P`` for all its topologies.

    Reads ``P`` back to the host to size the metadata (one synchronisation on a GPU).
    """
    check_make_topology_args(padded_bins, num_experts, ffn_hidden_size, block_size)
    if padded_tokens is None:
        if torch.compiler.is_compiling():
            # P sizes every output: under compile it comes from a scalar op, as an unbacked
            # size the fake can use (eager mode reads it inside the native build instead).
            padded_tokens = padded_block_rows(padded_bins, block_size) * block_size
    elif isinstance(padded_tokens, bool) or not isinstance(padded_tokens, (int, torch.SymInt)):
        raise TypeError(f"make_topology: padded_tokens must be an int or None, got {type(padded_tokens).__name__}")
    elif padded_tokens < 0 or padded_tokens % block_size:
        raise ValueError(f"make_topology: padded_tokens ({padded_tokens}) must be a non-negative multiple of "
                         f"block_size ({block_size})")
    meta = _topology(padded_bins, num_experts, ffn_hidden_size, block_size, padded_tokens)
    rows = meta[_FIELDS.index("offsets")].numel() - 1
    return Topology(*meta, shape=(rows * block_size, num_experts * ffn_hidden_size), block_size=block_size)
