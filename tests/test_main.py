"""``python -m blocksparse_moe`` and ``bench/layer.py`` on tiny shapes: they check, time,
report, write JSON/markdown/png, and the main job exits non-zero when a check fails."""

import json
import os
import sys

import pytest
import torch

import blocksparse_moe.__main__ as lb
from blocksparse_moe.__main__ import main
from blocksparse_moe.peers import PEERS

TINY = [
    lb.LayerShape("tiny-glu", 24, 16, 32, 4, 2, 16),
    lb.LayerShape("tiny-deepseek", 20, 16, 16, 8, 3, 16, shared=16,
                  options=dict(score="sigmoid", renormalize=True, expert_bias=True, scaling_factor=2.5)),
    lb.LayerShape("tiny-mlp", 16, 16, 16, 4, 1, 16, glu=False, activation="gelu"),
]
FAST = dict(min_runs=1, max_runs=1, budget_s=0.0)


@pytest.fixture
def tiny_shapes(monkeypatch):
    monkeypatch.setattr(lb, "CPU_SHAPES", TINY)
    monkeypatch.setattr(lb, "TIMING", FAST)


def test_main_job_passes_and_writes_json(tiny_shapes, tmp_path, capsys):
    path = tmp_path / "out.json"
    assert main(["--device", "cpu", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    for name in ("tiny-glu", "tiny-deepseek", "tiny-mlp", "TFLOP/s", "tokens/s"):
        assert name in text
    rows = json.loads(path.read_text())["rows"]
    ours = [r for r in rows if r["impl"] == "blocksparse_moe"]
    assert [r["shape"] for r in ours] == ["tiny-glu", "tiny-deepseek", "tiny-mlp"]
    for r in ours:
        assert r["check"] == "ok" and 0 <= r["worst_tol_ratio"] <= 1 and r["tokens_per_s"] > 0
    # Every shape has a row per peer: timed with the layer's output (the ceiling computes
    # another function), or skipped with the reason (transformers' experts have no plain MLP).
    peers = {(r["shape"], r["impl"]): r for r in rows if r["impl"] != "blocksparse_moe"}
    assert len(peers) == 3 * len(PEERS)
    for (shape, impl), r in peers.items():
        if impl == "transformers grouped_mm" and shape == "tiny-mlp":
            assert r["check"].startswith("skipped:") and "GLU" in r["check"]
            continue
        if impl == "transformers grouped_mm" and r["check"].startswith("skipped:"):
            assert "not available" in r["check"]  # transformers not installed
            continue
        assert r["check"] == ("-" if impl == "dense ceiling" else "same output"), (shape, impl, r["check"])
        assert r["ours_speedup"] > 0 and r["tflops"] > 0
    # GLU: 18*T*k*H*F useful FLOPs per forward+backward.
    assert TINY[0].useful_flops() == 18 * 24 * 2 * 16 * 32
    assert TINY[2].useful_flops(backward=False) == 4 * 16 * 1 * 16 * 16


def test_main_job_fails_when_a_check_fails(tiny_shapes, monkeypatch, capsys):
    # A tolerance no float32 layer can meet: the job must report it and exit 1.
    table = dict(lb.tolerance_table())
    table[("layer", torch.float32)] = (0.0, 1e-30)
    monkeypatch.setattr(lb, "tolerance_table", lambda: table)
    assert main(["--device", "cpu", "--shapes", "tiny-glu"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "FAILED: tiny-glu" in captured.err


def test_main_job_fails_when_a_peer_differs(tiny_shapes, monkeypatch, capsys):
    # A peer that computes something else is a failed comparison, not a timing to report.
    import blocksparse_moe.peers as peers

    monkeypatch.setattr(peers, "_loop", lambda layer: lambda x2, ids, weights: torch.zeros_like(x2))
    assert main(["--device", "cpu", "--shapes", "tiny-glu"]) == 1
    captured = capsys.readouterr()
    assert "DIFFERS" in captured.out and "torch loop's output differs" in captured.err


def test_main_job_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cpu", "--shapes", "no-such-shape"])
    assert exc.value.code == 2
    assert "unknown shapes" in capsys.readouterr().err


def test_layer_benchmark_writes_results(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    try:
        import layer as bench_layer
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(bench_layer, "CPU_SHAPES", [lb.LayerShape("tiny", 24, 16, 32, 4, 2, 16)])
    assert bench_layer.main(["--device", "cpu", "--runs", "1", "--out-dir", str(tmp_path)]) == 0
    files = sorted(os.listdir(tmp_path))
    assert [f.rsplit(".", 1)[1] for f in files][:2] == ["json", "md"] and files[0].startswith("layer-cpu")
    rows = json.loads((tmp_path / files[0]).read_text())["rows"]
    by_impl = {r["impl"]: r for r in rows}
    for name in ("blocksparse_moe", "hf-grouped_mm", "hf-batched_mm", "hf-eager (loop)", "dense ceiling",
                 "gemm floor"):
        assert by_impl[name]["status"] == "ok", (name, by_impl[name]["status"])
        assert by_impl[name]["step_tflops"] > 0 and by_impl[name]["vs_ceiling"] > 0
    # Peers that need a GPU or are not installed are rows that say why.
    for name in ("torch._grouped_mm", "megablocks", "scattermoe"):
        assert by_impl[name]["status"].startswith("skipped:") and len(by_impl[name]["status"]) > 10
    # Kept for backward: the fp32 pre-activation [T*k, 2F], the sort permutation and the
    # expert ids (int64 per slot), the expert sizes; nothing per token beyond that.
    ours = by_impl["blocksparse_moe"]
    k, f = 2, 32
    assert ours["kept_bytes_per_token"] <= k * 2 * f * 4 + 2 * k * 8 + 4 * 8 / 24 + 1e-9
    assert ours["host_syncs"] >= 0
    assert "| tiny |" in (tmp_path / files[1]).read_text()


def test_peer_forward_names_its_choices():
    from blocksparse_moe import DroplessMoE
    from blocksparse_moe.peers import peer_forward

    layer = DroplessMoE(16, 16, 4, 2, block_size=16)
    with pytest.raises(ValueError, match="name must be one of"):
        peer_forward(layer, "megablocks", torch.randn(3, 16))


def test_main_job_reports_a_peer_that_fails_when_run(tiny_shapes, monkeypatch, tmp_path):
    # A peer whose step raises (a GPU peer out of memory at a full-size shape) gets a row
    # saying so; the layer and the other peers are still timed, and the job passes.
    import blocksparse_moe.peers as peers

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("out of memory (simulated)")
    real = peers._loop
    monkeypatch.setattr(peers, "_loop", lambda layer: (lambda x2, ids, w: Boom.apply(real(layer)(x2, ids, w))))
    path = tmp_path / "out.json"
    assert main(["--device", "cpu", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    loop = [r for r in rows if r["impl"] == "torch loop"]
    assert len(loop) == 3
    for r in loop:
        assert r["check"] == "failed: out of memory (simulated)" and "step_ms" not in r
    assert all(r["check"] == "ok" and r["step_ms"] > 0 for r in rows if r["impl"] == "blocksparse_moe")
    assert all(r["step_ms"] > 0 for r in rows if r["impl"] == "dense ceiling")


def test_compare_peers_allows_two_tolerances_between_correct_implementations(monkeypatch):
    # Each implementation may be one tolerance off the exact result, in opposite directions.
    import blocksparse_moe.peers as peers
    from blocksparse_moe import DroplessMoE

    torch.manual_seed(0)
    layer = DroplessMoE(16, 16, 4, 2, block_size=16)
    x = torch.randn(8, 16)
    rtol, atol = 0.0, 1e-3
    checks = {}
    for shift, expected in ((1.9e-3, "same output"), (2.1e-3, "DIFFERS")):
        real = peers._loop
        monkeypatch.setattr(peers, "_loop", lambda layer, real=real, shift=shift:
                            (lambda x2, ids, w: real(layer)(x2, ids, w) + shift))
        got = dict(peers.compare_peers(layer, x, rtol, atol))
        checks[shift] = got["torch loop"]["check"]
        monkeypatch.setattr(peers, "_loop", real)
        assert checks[shift] == expected, checks


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm", "eager"])
def test_transformers_adapter_computes_the_reference(impl):
    # The one transformers adapter of the main job and bench/layer.py: our stacks w1
    # [E, 2F, H] and w2 [E, F, H] as gate_up_proj / down_proj; output and gradients that
    # reach our stacks, against the float64 reference.
    pytest.importorskip("transformers")
    from blocksparse_moe import reference
    from blocksparse_moe.peers import transformers_experts, transformers_module
    from tolerances import assert_close

    g = torch.Generator().manual_seed(4)
    e, f, h, t, k = 4, 8, 16, 12, 2
    w1 = torch.randn(e, 2 * f, h, generator=g, requires_grad=True)  # fp32: _grouped_mm has no fp64
    w2 = torch.randn(e, f, h, generator=g, requires_grad=True)
    x = torch.randn(t, h, generator=g)
    ids = torch.rand(t, e, generator=g).topk(k, dim=-1).indices
    weights = torch.softmax(torch.randn(t, k, generator=g), -1)
    out = transformers_experts(transformers_module(w1, w2, k), impl)(x, ids, weights)
    dout = torch.randn(out.shape, generator=g)
    out.backward(dout)
    got = (out.detach(), w1.grad, w2.grad)
    w1r, w2r = w1.detach().double().requires_grad_(True), w2.detach().double().requires_grad_(True)
    ref = reference.experts_reference(x.double(), ids, weights.double(), w1r[:, :f], w2r, w1r[:, f:])
    ref.backward(dout.double())
    for name, a, b in zip(("out", "dw1", "dw2"), got, (ref.detach(), w1r.grad, w2r.grad)):
        assert_close(a, b, torch.float32, "layer", f"transformers {impl} {name}")
