"""Sync-free routing of the fused expert path (``kernels/static_routing.py``, issue 17).

* the static bound ``P_max = round_down(T*k + min(E, T*k)*(b-1), b)``: never below the real
  ``P``, equal to it at the worst case of each term (every non-empty expert holds 1 mod b
  slots); equal to the most padded rows any routing of small sizes makes (brute force), and
  a SymInt under
  ``torch.compile(dynamic=True)`` without a recompile when T*k crosses E;
* the layout, on the interpreted Triton kernels (CUDA on a GPU), against the layout written here from ``reference.routing_reference`` (a plain-Python
  stable sort, histogram and running sums): named cases, a hypothesis property test, the
  kernels' loops taken several times (small chunk constexprs), outputs poisoned so an
  element no program stores fails;
* launches: one call makes exactly two Triton launches and, besides them, only the four
  output allocations (``aten.empty``), no torch op that runs a kernel.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from blocksparse_moe import backend, reference
from blocksparse_moe.kernels import _common
from blocksparse_moe.kernels import static_routing as S

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _round_up(x: int, b: int) -> int:
    return (x + b - 1) // b * b


def _round_down(x: int, b: int) -> int:
    return x // b * b


def expected_layout(ids: torch.Tensor, experts: int, b: int):
    """``(row_slots, block_expert, expert_offsets, tokens_per_expert)`` from the definition:
    expert e's slots (``reference.routing_reference``: stable sort by expert, counts, padded
    running sums) at rows ``padded_bins[e-1] + rank``, -1 on padding and past ``P``; block
    rows of e = ``[padded_bins[e-1]/b, padded_bins[e]/b)``, E past ``P``; sized by the bound
    written out here (``round_down(T*k + min(E, T*k)*(b-1), b)``)."""
    ref = reference.routing_reference(ids.cpu(), experts, b)
    n = ids.numel()
    p_max = _round_down(n + min(experts, n) * (b - 1), b)
    row_slots = [-1] * p_max
    for s, row in enumerate(ref["padded_rows"].tolist()):
        row_slots[row] = s
    ends = ref["padded_bins"].tolist()
    starts = [0] + ends[:-1]
    block_expert = [experts] * (p_max // b)
    for e in range(experts):
        for r in range(starts[e] // b, ends[e] // b):
            block_expert[r] = e
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return i32(row_slots), i32(block_expert), i32([0] + ends), ref["tokens_per_expert"].to(torch.int32)


@pytest.fixture
def route_path(monkeypatch):
    """The device of the Triton kernels (CUDA on a GPU, else the interpreter on CPU) with the
    outputs poisoned."""
    monkeypatch.setattr(S, "POISON_OUTPUTS", True)
    with backend.prefer_on_cpu("interpreter"):
        yield DEVICE


def check_route(ids: torch.Tensor, experts: int, b: int, device: torch.device = DEVICE) -> None:
    got = S.static_route(ids.to(device), experts, b)
    want = expected_layout(ids, experts, b)
    names = ("row_slots", "block_expert", "expert_offsets", "tokens_per_expert")
    for name, g, w in zip(names, got, want):
        assert g.dtype == torch.int32 and g.device == ids.to(device).device, name
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)}, want {tuple(w.shape)}"
        assert torch.equal(g.cpu(), w), f"{name}:\n got {g.tolist()}\nwant {w.tolist()}"


# -- the static bound -------------------------------------------------------------------------

def _worst(counts, top_k):
    """``[T, k]`` ids in which expert e holds ``counts[e]`` slots (shuffled over the slots)."""
    flat = torch.cat([torch.full((c,), e, dtype=torch.int64) for e, c in enumerate(counts)])
    flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(1))]
    return flat.reshape(-1, top_k)


# Every non-empty expert holds 1 mod b slots (pads b-1 rows) and min(E, T*k) are non-empty.
WORST = [
    pytest.param([1] * 6 + [0, 0], 2, 16, id="Tk<E-each-slot-its-own-expert"),
    pytest.param([1, 17, 33], 3, 16, id="Tk>E-every-expert-1-mod-b"),
    pytest.param([17] * 4, 4, 16, id="k=E-T=17"),
    pytest.param([1, 1, 1, 0, 0], 3, 32, id="T=1-k=3-distinct"),
    pytest.param([0, 1, 0], 1, 128, id="T=1-k=1"),
    pytest.param([65, 1, 129, 1], 1, 64, id="Tk>E-b64"),
]


@pytest.mark.parametrize("counts,top_k,b", WORST)
def test_bound_is_reached_at_the_worst_case(counts, top_k, b):
    ids = _worst(counts, top_k)
    tokens, experts = ids.shape[0], len(counts)
    n = tokens * top_k
    p = sum(_round_up(c, b) for c in counts)
    assert sum(c > 0 for c in counts) == min(experts, n)  # as many non-empty experts as can be
    assert S.padded_rows_bound(tokens, top_k, experts, b) == p
    if all(c % b == 1 for c in counts if c):  # each pads b-1 rows: both terms of the bound reached
        assert p == n + min(experts, n) * (b - 1)


def test_bound_without_slots():
    assert S.padded_rows_bound(0, 4, 8, 16) == 0
    assert S.padded_rows_bound(0, 1, 1, 128) == 0


def test_bound_against_the_most_any_routing_makes():
    # Brute force: best[n], the most padded rows n slots make among E experts (a knapsack over
    # the experts' counts), is b * floor((n + m(b-1)) / b) with m = min(E, n) (the module
    # docstring's claim), and the bound equals it: nothing tighter holds for every routing.
    b, most = 16, 40
    for experts in (1, 2, 3, 4, 5):
        best = [_round_up(n, b) for n in range(most + 1)]  # one expert
        for _ in range(experts - 1):
            best = [max(best[c] + _round_up(n - c, b) for c in range(n + 1)) for n in range(most + 1)]
        for n in range(most + 1):
            bound, m = S.padded_rows_bound(n, 1, experts, b), min(experts, n)
            assert best[n] == (n + m * (b - 1)) // b * b, (experts, n)
            assert bound == best[n], (experts, n, bound, best[n])


def test_bound_is_tighter_at_decode():
    # One token, k = 8 of E = 128 experts, b = 16: 8 blocks, not E blocks.
    assert S.padded_rows_bound(1, 8, 128, 16) == 8 * 16
    assert S.padded_rows_bound(1, 8, 128, 16) < _round_up(8 + 128 * 15, 16)


@pytest.mark.parametrize("counts,top_k,b", WORST[:3])
def test_worst_case_layout(counts, top_k, b, route_path):
    # P == P_max: no row past P, no tail to fill.
    check_route(_worst(counts, top_k), len(counts), b, route_path)


# -- the layout ---------------------------------------------------------------------------------

def _ids(kind: str, tokens: int, top_k: int, experts: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "distinct":
        return torch.rand(tokens, experts, generator=gen).topk(top_k, dim=1).indices
    if kind == "duplicates":
        return torch.randint(0, experts, (tokens, top_k), generator=gen)
    if kind == "one-expert":
        return torch.full((tokens, top_k), experts // 2, dtype=torch.int64)
    if kind == "skewed":
        ids = torch.randint(0, experts, (tokens, top_k), generator=gen)
        return torch.where(torch.rand(tokens, top_k, generator=gen) < 0.8, 0, ids)
    raise ValueError(kind)


CASES = [
    pytest.param("duplicates", 0, 2, 4, 16, id="no-tokens"),
    pytest.param("duplicates", 1, 1, 1, 16, id="E=1-one-slot"),
    pytest.param("duplicates", 9, 3, 1, 32, id="E=1"),
    pytest.param("distinct", 7, 5, 5, 16, id="k=E"),
    pytest.param("one-expert", 13, 2, 6, 128, id="all-slots-on-one-expert"),
    pytest.param("skewed", 37, 3, 6, 16, id="E-not-a-power-of-two-skewed"),
    pytest.param("distinct", 3, 2, 7, 64, id="Tk<E-empty-experts"),
    pytest.param("duplicates", 5, 4, 300, 16, id="E=300"),
    pytest.param("distinct", 1, 8, 128, 16, id="decode-one-token-k8-of-128"),
    pytest.param("skewed", 700, 2, 3, 32, id="Tk=1400-two-chunks"),
]


@pytest.mark.parametrize("kind,tokens,top_k,experts,b", CASES)
def test_layout(kind, tokens, top_k, experts, b, route_path):
    check_route(_ids(kind, tokens, top_k, experts), experts, b, route_path)


@pytest.mark.parametrize("layout", ["int32", "transposed", "column-slice"])
def test_layout_any_dtype_and_strides(layout, route_path):
    ids = _ids("duplicates", 11, 3, 5, seed=3)
    if layout == "int32":
        ids = ids.to(torch.int32)
    elif layout == "transposed":  # stride (1, T)
        ids = ids.t().contiguous().t()
    else:  # stride (6, 2): every other column of a [T, 6]
        ids = _ids("duplicates", 11, 6, 5, seed=3)[:, ::2]
    assert layout == "int32" or not ids.is_contiguous()
    check_route(ids, 5, 16, route_path)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 ids / 4 experts: every loop of the kernels runs several trips (the id
    scans, the experts' prefix sum, an expert's block rows, the tail past P in round robin)."""
    monkeypatch.setattr(S, "_CHUNK", 16)
    monkeypatch.setattr(S, "_EXPERT_CHUNK", 4)


@pytest.mark.parametrize("kind,tokens,top_k,experts,b", [
    pytest.param("skewed", 37, 3, 10, 16, id="scans-and-prefix-in-several-chunks"),
    pytest.param("one-expert", 40, 2, 9, 16, id="one-expert-owns-5-blocks-tail-of-8-programs"),
    pytest.param("distinct", 6, 3, 11, 128, id="tail-of-4000-rows"),
])
def test_layout_small_chunks(kind, tokens, top_k, experts, b, small_chunks, route_path):
    check_route(_ids(kind, tokens, top_k, experts), experts, b, route_path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(tokens=st.integers(0, 40), top_k=st.integers(1, 4), experts=st.integers(1, 24),
       b=st.sampled_from(S.BLOCK_SIZES), skew=st.floats(0.0, 1.0),
       degenerate=st.sampled_from(["none", "one-expert", "first-and-last", "every-other"]),
       small=st.booleans(), seed=st.integers(0, 2**16))
def test_layout_property(tokens, top_k, experts, b, skew, degenerate, small, seed, monkeypatch):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, experts, (tokens, top_k), generator=gen)
    ids = torch.where(torch.rand(tokens, top_k, generator=gen) < skew, experts - 1, ids)  # skewed
    if degenerate == "one-expert":
        ids = torch.full_like(ids, seed % experts)
    elif degenerate == "first-and-last":
        ids = torch.where(ids < experts // 2, 0, experts - 1)
    elif degenerate == "every-other":
        ids = ids // 2 * 2
    with monkeypatch.context() as m:
        m.setattr(S, "POISON_OUTPUTS", True)
        if small:
            m.setattr(S, "_CHUNK", 16)
            m.setattr(S, "_EXPERT_CHUNK", 4)
        with backend.prefer_on_cpu("interpreter"):
            check_route(ids, experts, b)
    # the reference's P (sum of padded counts) never passes the static bound
    p = int(reference.routing_reference(ids, experts, b)["padded_bins"][-1])
    assert p <= S.padded_rows_bound(tokens, top_k, experts, b)


def test_deterministic():
    ids = _ids("skewed", 50, 4, 7, seed=5).to(DEVICE)
    with backend.prefer_on_cpu("interpreter"):
        first, second = S.static_route(ids, 7, 16), S.static_route(ids, 7, 16)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


# -- launches -----------------------------------------------------------------------------------

ALLOCATIONS = {"aten.empty.memory_format", "aten.empty_strided.default"}


class _OpLog(TorchDispatchMode):
    """Every aten op run while ``inside`` is false (the Triton launches set it)."""

    def __init__(self):
        super().__init__()
        self.ops, self.inside = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not backend.interpreter_enabled(), reason="counts launches on the interpreter path")
def test_two_launches_and_no_torch_kernel(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    log, launched, guarded = _OpLog(), [], []
    run, launch = InterpretedFunction.run, _common.launch

    def counting_run(self, *args, **kwargs):  # every Triton launch, through _common or not
        launched.append(self.fn.__name__)
        log.inside = True
        try:
            return run(self, *args, **kwargs)
        finally:
            log.inside = False

    def counting_launch(kernel, *args, **kwargs):
        guarded.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    monkeypatch.setattr(_common, "launch", counting_launch)
    ids = _ids("duplicates", 8, 8, 64, seed=2)  # a decode step of 8 tokens, k = 8 of 64 experts
    with backend.prefer_on_cpu("interpreter"), log:
        got = S.static_route(ids, 64, 16)
    assert launched == ["_count_kernel", "_place_kernel"] and guarded == launched
    kernels = [op for op in log.ops if op not in ALLOCATIONS]
    assert kernels == [], f"torch ops besides the allocations: {kernels}"
    assert len(log.ops) == 4, log.ops  # row_slots, block_expert, expert_offsets, tokens_per_expert
    for g, w in zip(got, expected_layout(ids, 64, 16)):
        assert torch.equal(g, w)


# -- torch.compile --------------------------------------------------------------------------------

# Dynamo's own tracing (not this package) touches torch.jit.script_method.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("path_name", ["triton"])
def test_compiled_dynamic(path_name):
    """fullgraph + dynamic shapes: one graph for T*k below and above E (the bound is a SymInt
    expression with a min, not a guard on T*k < E), values against the reference."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def route(ids):
        row_slots, block_expert, offsets, counts = S.static_route(ids, 7, 16)
        return row_slots + 0, block_expert, offsets, counts

    compiled = torch.compile(route, fullgraph=True, dynamic=True, backend=counter)
    try:
        with backend.prefer_on_cpu("interpreter" if path_name == "triton" else "cpu"):
            # T*k = 6 < E = 7, then 18 and 66 > E (T != k: duck sizing would tie T to k = 2)
            for tokens in (3, 9, 33):
                ids = _ids("duplicates", tokens, 2, 7, seed=tokens)
                got = compiled(ids.to(DEVICE if path_name == "triton" else "cpu"))
                for g, w in zip(got, expected_layout(ids, 7, 16)):
                    assert torch.equal(g.cpu(), w), tokens
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1


# -- argument checks ------------------------------------------------------------------------------

def test_bad_arguments():
    ids = torch.zeros((3, 2), dtype=torch.int64)
    with pytest.raises(TypeError, match="expert_indices must be int32 or int64"):
        S.static_route(ids.float(), 4, 16)
    with pytest.raises(ValueError, match=r"expert_indices must be \[T, k\]"):
        S.static_route(ids.reshape(-1), 4, 16)
    with pytest.raises(ValueError, match="num_experts"):
        S.static_route(ids, 0, 16)
    with pytest.raises(ValueError, match="block_size"):
        S.static_route(ids, 4, 48)
    # 2^29 tokens x 4 slots: T*k alone passes the int32 range of the rows (no data is read)
    huge = torch.zeros((1, 1), dtype=torch.int64).expand(2**29, 4)
    with pytest.raises(ValueError, match="int32 range"):
        S.static_route(huge, 4, 16)


@pytest.mark.parametrize("path_name", ["triton"])
@pytest.mark.parametrize("tokens", [0, 5], ids=["no-tokens", "5-tokens"])
def test_opcheck(path_name, tokens):
    """The custom op's fake (shapes from shapes) against its implementation, static and dynamic."""
    ids = _ids("duplicates", tokens, 2, 6, seed=4)
    with backend.prefer_on_cpu("interpreter" if path_name == "triton" else "cpu"):
        torch.library.opcheck(S._static_route.op, (ids.to(DEVICE if path_name == "triton" else "cpu"), 6, 16))
