"""kernels/experts_fp8.py under Triton's interpreter against a reference written here from
the format's definition (issue 19), not from the package's code:

    weights   element (n, k) of expert e = w[e, n, k] * scale[e, n // 128, k // 128]
    quant(v)  per row and 128-wide group along the reduction dim (the last one may be short):
              s = max(amax, 1e-4) / 448 (fp32), q = e4m3(v / s); dequantized q * s
    layer     h = quant(x) @ W1[e]^T + b1, kept in x's dtype; a = act(g) * u (or act(h)) in
              fp32 from that h; y = quant(a) @ W2[e] + b2, times the top-k weight; summed
              over the k choices. The GEMMs in float64.

Both orientations of the kernels run here: the transposed product (``SWAP``, the rows on the
MMA's N side) at b = 16 and 32, the plain one at b = 64 and 128 (:func:`test_launch_plan`
pins which is which). The launch plan comes from ``_common``'s "fp8" tables like the bf16
path's: tested without a GPU on the tables themselves.

Tolerance: 1e-2 relative (Frobenius), the issue's bound. Where it comes from: both sides
quantize the same fp32 values with the same rule, so what is left is the fp32 accumulation
(~1e-6), the rounding of the output to x's dtype (bf16: ~2e-3 relative rms), and the few
elements of h whose fp32 and float64 sums round to different bf16 neighbours, each of which
can move one element of a to the next e4m3 value (1/16 relative): measured ~2.5e-3 for bf16
and ~2e-4 for fp16. A dropped group, a wrong or missing scale, a wrong row or expert, or a
truncating quantizer is 3e-2 to O(1). Outputs and every buffer the launcher allocates are
NaN-poisoned (``POISON_BUFFERS``): an element left unwritten fails, and NaN never passes.
"""

import math

import pytest
import torch
import triton
import triton.language as tl

from blocksparse_moe import backend
from blocksparse_moe.kernels import _common, experts_fp8
from blocksparse_moe.kernels._rowtile import _grid2

pytestmark = pytest.mark.skipif(not backend.interpreter_enabled(), reason="interpreter test (TRITON_INTERPRET=1)")

from blocksparse_moe.tolerances import FP8_FROBENIUS as REL_FROBENIUS  # noqa: E402 (the one table)
# fp32 x: h is not rounded, so both sides quantize a from fp32 values that differ by the fp32
# accumulation only (sqrt(K) u32 ~ 1e-6 relative) and a flip of an e4m3 rounding is ~1e-6
# likely per element; measured 8e-8. The fp32 "op" entry of the tolerance table (1e-5)
# holds it; a 1-ulp slip of the quantizer anywhere would not.
REL_FROBENIUS_FP32 = 1e-5
GROUP = 128
E4M3 = torch.float8_e4m3fn
ACTS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
        "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh"), "relu": torch.relu}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(experts_fp8, "POISON_BUFFERS", True)


# -- the reference, from the definition ------------------------------------------------------

def quant_dequant(v: torch.Tensor) -> torch.Tensor:
    """``v`` [R, K] fp32 quantized per row and 128-wide group of K, dequantized, float64."""
    rows, k = v.shape
    groups = math.ceil(k / GROUP)
    padded = torch.zeros(rows, groups * GROUP, dtype=torch.float32)
    padded[:, :k] = v
    padded = padded.view(rows, groups, GROUP)
    s = padded.abs().amax(dim=-1, keepdim=True).clamp(min=1e-4) / 448.0  # fp32, as defined
    q = (padded / s).to(E4M3)
    return (q.double() * s.double()).view(rows, groups * GROUP)[:, :k]


def dequant_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w`` [E, N, K] e4m3 with ``scale`` [E, ceil(N/128), ceil(K/128)] -> float64 [E, N, K]."""
    _, n, k = w.shape
    full = scale.double().repeat_interleave(GROUP, dim=1).repeat_interleave(GROUP, dim=2)
    return w.double() * full[:, :n, :k]


def reference(x, idx, weights, w1, s1, w2, s2, b1, b2, act, glu):
    tokens, top_k = idx.shape
    ffn = w2.shape[1]
    W1, W2 = dequant_weight(w1, s1), dequant_weight(w2, s2)
    xq = quant_dequant(x.float())
    out = torch.zeros(tokens, x.shape[1], dtype=torch.float64)
    for e in range(w1.shape[0]):
        t, j = (idx == e).nonzero(as_tuple=True)
        h = xq[t] @ W1[e].T
        if b1 is not None:
            h = h + b1[e].double()
        h = h.to(x.dtype).float()  # the pre-activation is kept in x's dtype
        a = ACTS[act](h[:, :ffn]) * h[:, ffn:] if glu else ACTS[act](h)  # fp32
        y = quant_dequant(a) @ W2[e]
        if b2 is not None:
            y = y + b2[e].double()
        if weights is not None:
            y = y * weights[t, j].double()[:, None]
        out.index_add_(0, t, y)
    return out


# -- inputs ----------------------------------------------------------------------------------

def fp8_weight(g, experts, n, k, *, transposed=False):
    """An e4m3 stack [E, n, k] and its block scales (uniform in [0.5, 1.5] / sqrt(k), so the
    products are O(1)); ``transposed``: stored [E, k, n] and returned as its transposed view,
    the layout of a checkpoint's down_proj, with the scales transposed the same way."""
    shape = (experts, k, n) if transposed else (experts, n, k)
    w = (torch.randn(*shape, generator=g) * 2).to(E4M3)
    sshape = tuple(math.ceil(d / GROUP) for d in shape[1:])
    s = (torch.rand(experts, *sshape, generator=g) + 0.5) / math.sqrt(k)
    if transposed:
        return w.transpose(1, 2), s.transpose(1, 2)
    return w, s


def make_case(T=24, H=160, F=64, E=4, k=2, b=16, glu=True, act="silu", bias=True, weighted=True,
              dtype=torch.bfloat16, ids=None, w2_transposed=True, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = 2 if glu else 1
    x = torch.randn(T, H, generator=g)
    x[torch.rand(T, H, generator=g) < 0.02] *= 20  # outliers: groups with very different amax
    if strided:  # x a column slice of a wider buffer, scales in transposed storage
        x = torch.cat([x, torch.randn(T, 7, generator=g)], 1)[:, :H]
    x = x.to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    ids = ids.to(torch.int64).contiguous()
    weights = torch.rand(T, k, generator=g) if weighted else None
    w1, s1 = fp8_weight(g, E, G * F, H)
    if strided:
        s1 = s1.transpose(1, 2).contiguous().transpose(1, 2)
    w2, s2 = fp8_weight(g, E, F, H, transposed=w2_transposed)
    b1 = (torch.randn(E, G * F, generator=g) * 0.5).to(dtype) if bias else None
    b2 = (torch.randn(E, H, generator=g) * 0.5).to(dtype) if bias else None
    return dict(x=x, expert_indices=ids, weights=weights, w1=w1, w1_scale=s1, w2=w2, w2_scale=s2, b1=b1, b2=b2,
                num_experts=E, act=act, glu=glu, block_size=b)


def run(case):
    kw = dict(case)
    args = [kw.pop(n) for n in ("x", "expert_indices", "weights", "w1", "w1_scale", "w2", "w2_scale", "b1", "b2")]
    return experts_fp8.experts_forward_fp8(*args, **kw)


def check(case, tol=REL_FROBENIUS):
    out = run(case)
    x = case["x"]
    assert out.shape == x.shape and out.dtype == x.dtype
    ref = reference(case["x"], case["expert_indices"], case["weights"], case["w1"], case["w1_scale"], case["w2"],
                    case["w2_scale"], case["b1"], case["b2"], case["act"], case["glu"])
    got = out.double()
    assert torch.isfinite(got).all(), f"{int((~torch.isfinite(got)).sum())} non-finite outputs (unwritten?)"
    err = float((got - ref).norm() / ref.norm().clamp(min=1e-30))
    assert err <= tol, f"relative Frobenius error {err:.3g} > {tol}"
    return out, err


T, E = 24, 4
# b = 16, 32: the transposed product (SWAP); b = 64, 128: the plain orientation.
CASES = [
    pytest.param(dict(), id="glu-silu-b16-swapped-bias-weights-H160-short-group"),
    pytest.param(dict(glu=False, act="gelu", F=192, b=32, T=20), id="plain-gelu-b32-swapped-F192-short-F-group"),
    pytest.param(dict(act="relu", F=192, b=64), id="glu-relu-b64-plain-two-row-tiles-per-block"),
    pytest.param(dict(act="gelu_tanh", bias=False), id="glu-gelu_tanh-no-bias",
                 # the interpreter's numpy exp overflows to inf for |h| >~ 45: sigmoid -> 0, exact
                 marks=pytest.mark.filterwarnings("ignore:overflow encountered in exp")),
    pytest.param(dict(glu=False, act="relu", weighted=False), id="plain-relu-weights-none"),
    pytest.param(dict(k=1, T=30), id="k1-down-writes-out"),
    pytest.param(dict(k=E, T=10), id="k-equals-E"),
    pytest.param(dict(ids=torch.tensor([[0, 2], [3, 0], [2, 3]] * 8)), id="empty-expert-1"),
    pytest.param(dict(k=1, T=40, ids=torch.full((40, 1), 2)), id="one-expert-takes-all"),
    pytest.param(dict(ids=torch.tensor([[1, 1]] * 5 + [[0, 3]] * 3), T=8), id="token-names-one-expert-twice"),
    pytest.param(dict(H=256, F=128, b=128, T=12, E=2), id="b128-plain-H-F-whole-groups"),
    pytest.param(dict(glu=False, act="silu", H=200, F=128, b=128, T=14, E=3), id="plain-silu-b128-plain"),
    pytest.param(dict(act="gelu", F=128, b=32, k=1, T=20, weighted=False), id="glu-gelu-b32-swapped-k1"),
    pytest.param(dict(H=300, F=48, b=16, T=9), id="H300-three-groups-F48"),
    pytest.param(dict(dtype=torch.float16), id="fp16"),
    pytest.param(dict(w2_transposed=False), id="w2-contiguous-N-major"),
    pytest.param(dict(strided=True), id="strided-x-and-w1-scale"),
]


@pytest.mark.parametrize("params", CASES)
def test_matches_definition(params):
    check(make_case(**params))


@pytest.mark.parametrize("params", [dict(glu=False, act="relu"), dict(act="silu", F=192, b=32)],
                         ids=["plain-relu", "glu-silu-F192"])
def test_fp32_x_quantizes_exactly_as_defined(params):
    """With fp32 x nothing is rounded between the quantizations: the kernel's result is the
    definition's to fp32 accumulation (a slip of one e4m3 rounding in a group shows)."""
    check(make_case(dtype=torch.float32, **params), tol=REL_FROBENIUS_FP32)


def test_deterministic():
    """Two runs bitwise equal (no atomics; k slots summed in a fixed order)."""
    case = make_case(seed=3)
    assert torch.equal(run(case).view(torch.int16), run(case).view(torch.int16))


def test_zero_tokens():
    out = run(make_case(T=0))
    assert out.shape == (0, 160) and out.dtype == torch.bfloat16


def test_zero_input_row_gets_bias_path_only():
    """An all-zero x row: its groups' amax is 0, the floor 1e-4 keeps the scale finite (no
    0/0), so h = b1 exactly and the row still matches the reference."""
    case = make_case(T=8)
    case["x"][3] = 0
    out, _ = check(case)
    assert torch.isfinite(out[3].float()).all()


# -- the quantizer, bit for bit -------------------------------------------------------------

@triton.jit
def _quantize_probe(v_ptr, q_ptr, s_ptr, K, ROWS: tl.constexpr, SWAP: tl.constexpr):
    r = tl.arange(0, ROWS)
    rr, cc = _grid2(r, tl.arange(0, 128), SWAP)  # with SWAP the tile is [128, ROWS]
    v = tl.load(v_ptr + rr * K + cc, mask=(rr >= 0) & (cc < K), other=0.0)
    q, s = experts_fp8._quantize(v, SWAP, True)
    tl.store(q_ptr + rr * 128 + cc, q)
    tl.store(s_ptr + r, s)


@pytest.mark.parametrize("swap", [False, True], ids=["rows-on-dim0", "swapped-rows-on-dim1"])
@pytest.mark.parametrize("width", [128, 44], ids=["whole-group", "short-group"])
def test_quantizer_is_the_definition_bit_for_bit(width, swap):
    """Scales and e4m3 values exactly those of the definition (torch's round-to-nearest-even
    cast): every binade of e4m3 incl. subnormals, exact ties, a zero row (scale floor),
    rows below the floor, the 448 end."""
    g = torch.Generator().manual_seed(0)
    rows = 64
    v = torch.randn(rows, width, generator=g) * torch.logspace(-7, 4, rows)[:, None]
    v[0] = 0
    v[1, :] = 448.0 * 2.0 ** -torch.arange(width).remainder(20).float()  # s = 1: every binade, subnormals
    v[2, :] = 448.0 * (torch.arange(width).float() / width)               # s = 1: ties between e4m3 values
    q = torch.empty(rows, 128)
    s = torch.empty(rows)
    _quantize_probe[(1,)](v.contiguous(), q, s, width, ROWS=rows, SWAP=swap)
    s_ref = v.abs().amax(1).clamp(min=1e-4) / 448.0
    q_ref = (v / s_ref[:, None]).to(E4M3).float()
    assert torch.equal(s, s_ref)
    assert torch.equal(q[:, :width], q_ref), f"{int((q[:, :width] != q_ref).sum())} quantized values differ"
    assert torch.equal(q[:, width:], torch.zeros_like(q[:, width:]))


# -- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("change, error, match", [
    (lambda c: c.update(w1_scale=c["w1_scale"][:, :, :1]), ValueError, "w1_scale must be"),
    (lambda c: c.update(w2_scale=c["w2_scale"].double()), TypeError, "w2_scale must be float32"),
    (lambda c: c.update(w1=c["w1"].to(torch.bfloat16)), TypeError, "w1 must be torch.float8_e4m3fn"),
    (lambda c: c.update(block_size=128), ValueError, "multiple of block_size"),
    (lambda c: c.update(act="tanh"), ValueError, "act must be one of"),
], ids=["w1-scale-shape", "w2-scale-dtype", "w1-not-fp8", "F-not-multiple-of-b", "unknown-act"])
def test_bad_arguments_raise_before_launch(change, error, match):
    case = make_case(T=4)
    change(case)
    with pytest.raises(error, match=match):
        run(case)


@pytest.mark.parametrize("capability, ok", [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True),
                                            ((10, 0), True), ((12, 0), True)],
                         ids=["sm80", "sm86", "sm89", "sm90", "sm100", "sm120"])
def test_gpu_without_fp8_tensor_cores_is_refused(capability, ok):
    """What a launch asks of a CUDA device: sm_89+ gets the "fp8" table of its family (BLOCK_K
    the 128-wide group), older a ValueError that says why (no silent fallback)."""
    if ok:
        configs = _common.tile_configs(64, "", dtype=torch.float8_e4m3fn, capability=capability)
        assert configs and {c["BLOCK_K"] for c in configs} == {128}
    else:
        with pytest.raises(ValueError, match="fp8 tensor cores"):
            _common.tile_configs(64, "", dtype=torch.float8_e4m3fn, capability=capability)


# -- the launch plan (as experts.py's: _common.launch with Tiles) ---------------------------

def _launches(monkeypatch, case):
    """``[(kernel name, tiles, args, constexprs)]`` of the fp8 launches of one call, recorded
    instead of run (the routing's launches run)."""
    calls, launch = [], _common.launch

    def record(kernel, grid, *args, device, tiles=None, **kwargs):
        if kernel not in (experts_fp8._up_fp8_kernel, experts_fp8._down_fp8_kernel):
            return launch(kernel, grid, *args, device=device, tiles=tiles, **kwargs)
        calls.append((kernel.fn.__name__, tiles, args, kwargs))

    monkeypatch.setattr(_common, "launch", record)
    run(case)
    return calls


@pytest.mark.parametrize("b", [16, 32, 64, 128])
def test_launch_plan(monkeypatch, b):
    """Per block size: the orientation (transposed below 64 rows), the rows-by-slot h buffer
    (no padding rows), the autotune key's token-count class, and on sm_90 tiles that divide
    what they must and give wgmma a 64-row M side (the rows, or with SWAP the columns)."""
    F, T, k = 384, 24, 2  # col_tile(F) = 128
    calls = _launches(monkeypatch, make_case(T=T, k=k, F=F, b=b))
    assert [name for name, *_ in calls] == ["_up_fp8_kernel", "_down_fp8_kernel"]
    (_, up, up_args, up_kw), (_, down, down_args, down_kw) = calls
    assert up_kw["SWAP"] == down_kw["SWAP"] == (b < 64)
    hidden = up_args[4]
    assert tuple(hidden.shape) == (T * k, 2 * F) and down_args[0] is hidden, "h by slot: [T*k, G*F]"
    for tiles, width in ((up, F), (down, 128)):
        assert tiles.dtype == torch.float8_e4m3fn and tiles.block_size == b
        assert _common.token_class(T * k) in tiles.key
        for cfg in tiles.variants((9, 0)):
            assert cfg["BLOCK_K"] == 128 and b % cfg["BLOCK_M"] == 0 and width % cfg["BLOCK_N"] == 0, cfg
            assert (cfg["BLOCK_N"] if b < 64 else cfg["BLOCK_M"]) >= 64, f"no 64-row M side for wgmma: {cfg}"


def test_decode_and_prefill_tune_apart(monkeypatch):
    decode = _launches(monkeypatch, make_case(T=4, b=16))[0][1]
    prefill = _launches(monkeypatch, make_case(T=200, b=16))[0][1]
    assert decode.key != prefill.key


def test_deterministic_mode_takes_the_tables_first_config(monkeypatch):
    """On a GPU (faked: sm_90) deterministic mode skips the autotuner: the table's first entry."""
    tiles = _launches(monkeypatch, make_case(b=128, F=128, H=256))[1][1]
    monkeypatch.setattr(_common, "interpret_flag", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_common, "_TUNED", {})
    device = torch.device("cuda", 0)
    candidates = tiles.variants((9, 0))
    assert len(candidates) > 1
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runner, meta = _common._runner(experts_fp8._down_fp8_kernel, tiles, device, "ieee")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert runner is experts_fp8._down_fp8_kernel and not _common._TUNED
    assert meta == {k: v for k, v in candidates[0].items() if k not in ("INTERPRET", "INPUT_PRECISION")}
