"""The dense PyTorch references every result is checked against.

Everything here is plain, obviously-correct torch written without the package's ops (no
``sdd``/``dsd``/permute calls): loops over experts with boolean masks, dense matmuls. It is
the ground truth for the tests and for ``python -m blocksparse_moe``. Pass float64 tensors to
get a float64 reference (tests compute it from the already-rounded inputs of the op under test).

Each op family owns one section below; edit only your own section.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

# ---------------------------------------------------------------------------------------
# MoE reference: activations, router, dense per-expert loop
# ---------------------------------------------------------------------------------------

REFERENCE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def activation_reference(x: torch.Tensor, name: str) -> torch.Tensor:
    """The expert activations, written from their definitions (not ``F.silu`` & co)."""
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "gelu":  # exact (erf) GELU, torch's and HF's "gelu"
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if name == "gelu_tanh":  # tanh approximation, HF's "gelu_pytorch_tanh"
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    if name == "relu":
        return torch.where(x > 0, x, torch.zeros_like(x))
    raise ValueError(f"activation_reference: unknown activation {name!r}; expected one of {REFERENCE_ACTIVATIONS}")


def router_reference(logits: torch.Tensor, top_k: int, *, score: str = "softmax", renormalize: bool = True,
                     expert_bias: Optional[torch.Tensor] = None, scaling_factor: float = 1.0,
                     expert_indices: Optional[torch.Tensor] = None):
    """Top-k routing from router logits ``[T, E]``.

    ``scores = softmax(logits)`` or ``sigmoid(logits)``; the ``top_k`` experts with the highest
    ``scores + expert_bias`` are chosen (the bias steers selection only, DeepSeek-V3's
    aux-loss-free balancing); their weights are the unbiased scores, divided by their sum when
    ``renormalize``, times ``scaling_factor``. ``expert_indices [T, k]`` overrides the selection
    (tests pass the module's choice so a near-tie cannot flip between dtypes).

    Returns ``(weights [T, k], indices [T, k] int64, scores [T, E])``.
    """
    if score == "softmax":
        shifted = logits - logits.max(dim=-1, keepdim=True).values
        e = torch.exp(shifted)
        scores = e / e.sum(dim=-1, keepdim=True)
    elif score == "sigmoid":
        scores = 1.0 / (1.0 + torch.exp(-logits))
    else:
        raise ValueError(f"router_reference: score must be 'softmax' or 'sigmoid', got {score!r}")
    if expert_indices is None:
        selection = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
        indices = torch.topk(selection, top_k, dim=-1).indices
    else:
        indices = expert_indices.to(torch.int64)
    weights = torch.gather(scores, 1, indices)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * scaling_factor, indices, scores


def load_balancing_loss_reference(scores: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer balancing loss ``E * sum_e f_e * P_e``.

    ``f_e``: fraction of the ``T*k`` routed slots sent to expert ``e`` (no gradient);
    ``P_e``: mean over tokens of the per-token-normalised score of ``e``. Uniform routing gives 1.
    """
    t, k = indices.shape
    counts = torch.stack([(indices == e).sum() for e in range(num_experts)]).to(scores.dtype)
    f = counts / (t * k)
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)
    return num_experts * (f * p).sum()


def z_loss_reference(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: ``mean_t (log sum_e exp(logits_te))^2``."""
    m = logits.max(dim=-1, keepdim=True).values
    lse = torch.log(torch.exp(logits - m).sum(dim=-1)) + m.squeeze(-1)
    return (lse * lse).mean()


def mlp_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: Optional[torch.Tensor] = None, *,
                  b1: Optional[torch.Tensor] = None, b2: Optional[torch.Tensor] = None,
                  b3: Optional[torch.Tensor] = None, activation: str = "silu") -> torch.Tensor:
    """One dense expert in the module's layout: ``w1, w3, w2`` are all ``[F, H]``.

    GLU (``w3`` given): ``(act(x w1^T + b1) * (x w3^T + b3)) w2 + b2``; plain MLP:
    ``act(x w1^T + b1) w2 + b2``.
    """
    h = x @ w1.t()
    if b1 is not None:
        h = h + b1
    a = activation_reference(h, activation)
    if w3 is not None:
        u = x @ w3.t()
        if b3 is not None:
            u = u + b3
        a = a * u
    y = a @ w2
    if b2 is not None:
        y = y + b2
    return y


def experts_reference(x: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor,
                      w1: torch.Tensor, w2: torch.Tensor, w3: Optional[torch.Tensor] = None, *,
                      b1: Optional[torch.Tensor] = None, b2: Optional[torch.Tensor] = None,
                      b3: Optional[torch.Tensor] = None, activation: str = "silu") -> torch.Tensor:
    """``out[t] = sum_j expert_weights[t, j] * MLP_{expert_indices[t, j]}(x[t])``, one expert at a time.

    ``x [T, H]``; ``w1, w3, w2 [E, F, H]``; ``b1, b3 [E, F]``; ``b2 [E, H]``.
    """
    num_experts = w1.shape[0]

    def per_expert(t):
        # unbind once: its backward stacks the experts' gradients in one op, where
        # indexing t[e] per expert would build a zero [E, ...] gradient per expert.
        return [None] * num_experts if t is None else t.unbind(0)

    w1s, w2s, w3s, b1s, b2s, b3s = (per_expert(t) for t in (w1, w2, w3, b1, b2, b3))
    out = torch.zeros_like(x)
    for e in range(num_experts):
        token, choice = torch.nonzero(expert_indices == e, as_tuple=True)
        if token.numel() == 0:
            continue
        y = mlp_reference(x[token], w1s[e], w2s[e], w3s[e], b1=b1s[e], b2=b2s[e], b3=b3s[e], activation=activation)
        out = out.index_add(0, token, y * expert_weights[token, choice].unsqueeze(-1))
    return out


def moe_reference(x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  w3: Optional[torch.Tensor] = None, *, top_k: int, activation: str = "silu",
                  b1: Optional[torch.Tensor] = None, b2: Optional[torch.Tensor] = None,
                  b3: Optional[torch.Tensor] = None, score: str = "softmax", renormalize: bool = True,
                  expert_bias: Optional[torch.Tensor] = None, scaling_factor: float = 1.0,
                  expert_indices: Optional[torch.Tensor] = None, shared: Optional[dict] = None) -> dict:
    """The whole MoE layer, densely: router, per-expert loop, optional shared expert.

    Args:
        x: ``[..., H]``.
        router_weight: ``[E, H]`` (logits ``= x @ router_weight^T``).
        w1, w2, w3, b1, b2, b3: the experts, see :func:`experts_reference`.
        shared: the always-on shared expert, keys ``w1, w2, w3, b1, b2, b3`` as in
            :func:`mlp_reference` (``[S, H]`` weights) and an optional ``gate [1, H]``
            (output scaled by ``sigmoid(x @ gate^T)``, Qwen2-MoE's shared-expert gate).
        The rest: see :func:`router_reference`.

    Returns a dict: ``out [..., H]``, ``logits``, ``scores [T, E]``, ``weights``, ``indices [T, k]``,
    ``load_balancing_loss``, ``z_loss``.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    logits = x2 @ router_weight.t()
    weights, indices, scores = router_reference(logits, top_k, score=score, renormalize=renormalize,
                                                expert_bias=expert_bias, scaling_factor=scaling_factor,
                                                expert_indices=expert_indices)
    out = experts_reference(x2, indices, weights, w1, w2, w3, b1=b1, b2=b2, b3=b3, activation=activation)
    if shared is not None:
        s = mlp_reference(x2, shared["w1"], shared["w2"], shared.get("w3"), b1=shared.get("b1"),
                          b2=shared.get("b2"), b3=shared.get("b3"), activation=activation)
        if shared.get("gate") is not None:
            s = s * torch.sigmoid(x2 @ shared["gate"].t())
        out = out + s
    t = x2.shape[0]
    lb = load_balancing_loss_reference(scores, indices, router_weight.shape[0]) if t else logits.sum() * 0
    z = z_loss_reference(logits) if t else logits.sum() * 0
    return dict(out=out.reshape(shape), logits=logits, scores=scores, weights=weights, indices=indices,
                load_balancing_loss=lb, z_loss=z)

# ---------------------------------------------------------------------------------------
# permute reference: padded_gather / padded_scatter, gather / scatter
# ---------------------------------------------------------------------------------------
# Written slot by slot from the routing's definition (slot s = t*k + j goes to row
# rows[s]), with plain advanced indexing so autograd gives the reference gradients.
# Computed in the dtype of the inputs (pass float64); ``weights`` is cast to ``y``'s dtype.


def _permute_rows(routing, top_k: int, padded: bool) -> torch.Tensor:
    if top_k != routing.top_k:
        raise ValueError(f"reference permute: top_k={top_k} but routing.top_k={routing.top_k}")
    return (routing.padded_rows if padded else routing.rows).long()


def _gather_ref(x: torch.Tensor, rows: torch.Tensor, num_rows: int, top_k: int) -> torch.Tensor:
    tokens = torch.arange(rows.numel(), device=x.device) // top_k  # token of each slot
    out = x.new_zeros((num_rows, x.shape[1]))
    return out.index_put((rows,), x[tokens])  # padding rows stay zero


def _scatter_ref(y: torch.Tensor, rows: torch.Tensor, weights: Optional[torch.Tensor], top_k: int) -> torch.Tensor:
    T = rows.numel() // top_k
    picked = y[rows].reshape(T, top_k, y.shape[1])  # [T, k, H]: each token's k expert rows
    if weights is not None:
        picked = picked * weights.to(y.dtype).unsqueeze(-1)
    return picked.sum(1)


def padded_gather(x: torch.Tensor, routing, top_k: int) -> torch.Tensor:
    """``out [P, H]``: ``out[padded_rows[s]] = x[s // k]``, padding rows zero."""
    return _gather_ref(x, _permute_rows(routing, top_k, True), routing.padded_tokens, top_k)


def gather(x: torch.Tensor, routing, top_k: int) -> torch.Tensor:
    """``out [T*k, H]``: ``out[rows[s]] = x[s // k]``."""
    return _gather_ref(x, _permute_rows(routing, top_k, False), routing.num_tokens * top_k, top_k)


def padded_scatter(y: torch.Tensor, routing, weights: Optional[torch.Tensor], top_k: int) -> torch.Tensor:
    """``out [T, H]``: ``out[t] = sum_j w[t, j] * y[padded_rows[t*k + j]]`` (w = 1 when None)."""
    return _scatter_ref(y, _permute_rows(routing, top_k, True), weights, top_k)


def scatter(y: torch.Tensor, routing, weights: Optional[torch.Tensor], top_k: int) -> torch.Tensor:
    """``out [T, H]``: ``out[t] = sum_j w[t, j] * y[rows[t*k + j]]`` (w = 1 when None)."""
    return _scatter_ref(y, _permute_rows(routing, top_k, False), weights, top_k)

# ---------------------------------------------------------------------------------------
# routing and topology reference: expert ids -> Routing fields, padded_bins -> Topology
# ---------------------------------------------------------------------------------------
# Written from the definitions in routing.py / topology.py with Python lists and loops
# only (no torch sort, bincount or cumsum, nothing from the package), so that they share
# no code with the native ops or with the torch fallbacks they are compared against.
# Results are int32 CPU tensors, the dtype the package promises.

ROUTING_FIELDS = ("indices", "bin_ids", "tokens_per_expert", "bins", "padded_bins", "rows", "padded_rows")
TOPOLOGY_FIELDS = ("row_indices", "column_indices", "offsets", "column_indices_t", "offsets_t", "block_offsets_t")


def _int_list(t) -> list:
    return [int(v) for v in (t.reshape(-1).tolist() if isinstance(t, torch.Tensor) else t)]


def _i32(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def routing_reference(expert_indices, num_experts: int, block_size: int) -> dict:
    """The seven int32 fields of :class:`blocksparse_moe.Routing` for ``expert_indices [T, k]``.

    Slot ``s = t*k + j`` is token ``t``'s ``j``-th choice. Slots are sorted by expert, stably
    (Python's ``sorted`` is stable: slots of one expert keep their order); expert ``e``'s
    group starts at ``bins[e] - tokens_per_expert[e]`` unpadded and at
    ``padded_bins[e] - padded[e]`` padded, ``padded[e]`` its count rounded up to the block.
    """
    ids = _int_list(expert_indices)
    n = len(ids)
    tokens_per_expert = [0] * num_experts
    for e in ids:
        tokens_per_expert[e] += 1
    bins, padded_bins, total, padded_total = [], [], 0, 0
    for count in tokens_per_expert:
        total += count
        padded_total += (count + block_size - 1) // block_size * block_size
        bins.append(total)
        padded_bins.append(padded_total)
    indices = sorted(range(n), key=lambda s: ids[s])
    bin_ids = [ids[s] for s in indices]
    rows, padded_rows = [0] * n, [0] * n
    for position, s in enumerate(indices):
        e = ids[s]
        group_start = bins[e] - tokens_per_expert[e]
        padded_start = padded_bins[e] - (tokens_per_expert[e] + block_size - 1) // block_size * block_size
        rows[s] = position
        padded_rows[s] = padded_start + (position - group_start)
    return {name: _i32(value) for name, value in zip(
        ROUTING_FIELDS, (indices, bin_ids, tokens_per_expert, bins, padded_bins, rows, padded_rows))}


def moe_blocks(padded_bins, num_experts: int, ffn_hidden_size: int, block_size: int) -> list:
    """The stored blocks ``(block row, block column)`` of the ``P x (E*F)`` MoE pattern: block
    row ``r`` of expert ``e`` (``padded_bins[e-1] <= r*b < padded_bins[e]``) stores exactly the
    ``F/b`` block columns ``e*F/b .. (e+1)*F/b - 1``."""
    bins = _int_list(padded_bins)
    if len(bins) != num_experts:
        raise ValueError(f"moe_blocks: {len(bins)} padded bins for {num_experts} experts")
    fb = ffn_hidden_size // block_size
    blocks, start = [], 0
    for e, end in enumerate(bins):
        for r in range(start // block_size, end // block_size):
            for j in range(fb):
                blocks.append((r, e * fb + j))
        start = end
    return blocks


def moe_block_mask(padded_bins, num_experts: int, ffn_hidden_size: int, block_size: int) -> list:
    """``[P/b][E*F/b]`` list of bools: True at the blocks of :func:`moe_blocks`."""
    bins = _int_list(padded_bins)
    block_rows = bins[-1] // block_size if bins else 0
    mask = [[False] * (num_experts * ffn_hidden_size // block_size) for _ in range(block_rows)]
    for r, c in moe_blocks(bins, num_experts, ffn_hidden_size, block_size):
        mask[r][c] = True
    return mask


def block_topology_reference(blocks: list, block_rows: int, block_columns: int) -> dict:
    """The six int32 metadata fields (``TOPOLOGY_FIELDS``) of any pattern of stored blocks
    ``[(block row, block column), ...]`` in a ``block_rows x block_columns`` grid.

    Row-major: the blocks listed row by row, columns ascending (``row_indices``,
    ``column_indices``; ``offsets[r]`` = blocks in rows before ``r``). Column-major, for the
    transpose: the same blocks listed column by column, rows ascending (``column_indices_t``
    = their block rows, ``offsets_t[c]`` = blocks in columns before ``c``, ``block_offsets_t``
    = their position in the row-major list, i.e. in ``data``).
    """
    row_major = sorted(set(blocks))
    if len(row_major) != len(blocks):
        raise ValueError("block_topology_reference: duplicate blocks")
    position = {rc: i for i, rc in enumerate(row_major)}
    column_major = sorted(row_major, key=lambda rc: (rc[1], rc[0]))
    per_row, per_column = [0] * block_rows, [0] * block_columns
    for r, c in row_major:
        per_row[r] += 1
        per_column[c] += 1
    offsets, offsets_t = [0], [0]
    for count in per_row:
        offsets.append(offsets[-1] + count)
    for count in per_column:
        offsets_t.append(offsets_t[-1] + count)
    fields = ([r for r, _ in row_major], [c for _, c in row_major], offsets,
              [r for r, _ in column_major], offsets_t, [position[rc] for rc in column_major])
    return {name: _i32(value) for name, value in zip(TOPOLOGY_FIELDS, fields)}


def topology_reference(padded_bins, num_experts: int, ffn_hidden_size: int, block_size: int) -> dict:
    """The six int32 fields of the ``P x (E*F)`` MoE topology (:func:`blocksparse_moe.make_topology`),
    plus ``shape`` ``(P, E*F)`` with ``P = padded_bins[-1]`` and ``block_size``. The products'
    references below take this dict as well as a ``Topology``."""
    bins = _int_list(padded_bins)
    block_rows = bins[-1] // block_size if bins else 0
    block_columns = num_experts * ffn_hidden_size // block_size
    out = block_topology_reference(moe_blocks(bins, num_experts, ffn_hidden_size, block_size), block_rows,
                                   block_columns)
    out["shape"] = (block_rows * block_size, num_experts * ffn_hidden_size)
    out["block_size"] = block_size
    return out


# ---------------------------------------------------------------------------------------
# block-sparse products reference: sdd / dsd / dds on a block pattern
# ---------------------------------------------------------------------------------------
# The pattern is given by the COO pairs (block row, block column) of the stored blocks in
# ``data`` order -- ``topology.row_indices`` / ``column_indices``, the definition of the
# matrix that the caller hands the op -- and nothing else: the transposed metadata that
# the kernels read for S^T is deliberately not used, so a wrong read of it shows. Dense
# matrices are made and cut one block at a time (no ``SparseMatrix.to_dense``). Pass
# float64 operands; autograd through these gives the reference gradients.


def _pattern(topology):
    """``(block_size, shape, [(block row, block column) of data[0], data[1], ...])`` of a
    ``Topology`` or of a :func:`topology_reference` dict."""
    if isinstance(topology, dict):
        rows, cols = topology["row_indices"], topology["column_indices"]
        b, shape = topology["block_size"], topology["shape"]
    else:
        rows, cols, b, shape = topology.row_indices, topology.column_indices, topology.block_size, topology.shape
    return b, tuple(shape), list(zip(_int_list(rows), _int_list(cols)))


def block_dense(data: torch.Tensor, topology, transposed: bool = False) -> torch.Tensor:
    """The dense ``[M, N]`` matrix (``[N, M]`` when ``transposed``) whose block ``(r, c)`` is
    ``data[n]`` for the ``n``-th stored pair ``(r, c)``, zero elsewhere."""
    b, (m, n), coo = _pattern(topology)
    dense = data.new_zeros((m, n))
    for i, (r, c) in enumerate(coo):
        dense[r * b:(r + 1) * b, c * b:(c + 1) * b] = data[i]
    return dense.t() if transposed else dense


def dense_to_blocks(dense: torch.Tensor, topology) -> torch.Tensor:
    """``[nnz, b, b]``: the stored blocks of a dense ``topology.shape`` matrix, in ``data`` order."""
    b, _, coo = _pattern(topology)
    blocks = [dense[r * b:(r + 1) * b, c * b:(c + 1) * b] for r, c in coo]
    return torch.stack(blocks) if blocks else dense.new_zeros((0, b, b))


def sdd_reference(a: torch.Tensor, b: torch.Tensor, topology) -> torch.Tensor:
    """``data [nnz, b, b]``: ``data[n] = (a @ b)[block (r, c)]`` for the ``n``-th stored ``(r, c)``."""
    return dense_to_blocks(a @ b, topology)


def dsd_reference(data: torch.Tensor, b: torch.Tensor, topology, transposed: bool = False) -> torch.Tensor:
    """``S @ b`` (``S^T @ b`` when ``transposed``) with ``S = block_dense(data, topology)``."""
    return block_dense(data, topology, transposed) @ b


def dds_reference(a: torch.Tensor, data: torch.Tensor, topology, transposed: bool = False) -> torch.Tensor:
    """``a @ S`` (``a @ S^T`` when ``transposed``) with ``S = block_dense(data, topology)``."""
    return a @ block_dense(data, topology, transposed)
