"""torch.compile: every custom op's fake against its implementation, and compiled layers.

* ``torch.library.opcheck`` runs each ``blocksparse_moe::`` op for real and under fake
  tensors (static and dynamic shapes) and compares shapes, dtypes and strides; the products,
  permutes and activations on both CPU back ends (torch path, interpreted Triton kernels).
* ``torch.compile(..., fullgraph=True)`` of ``DroplessMoE`` (GLU and plain MLP, biases,
  shared expert, block sizes 16 and 32) and of the functional ops: the compiled and the
  eager run are each compared with the float64 reference (``reference.moe_reference``, and
  the products / permutes / routing of ``reference.py`` for the functional pipelines), never
  with each other (they run the same function). fullgraph raises on any graph break; a
  compile counter checks that there is exactly one graph and that a new token count does
  not recompile (dynamic T).
* Value checks that read data still raise ``ValueError`` naming the argument when compiled.

Most cases use the ``aot_eager`` backend (AOTAutograd traces forward and backward, no code
generation); one small case runs the default inductor backend (it compiles C++ on CPU).
"""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import blocksparse_moe as bm
from blocksparse_moe import backend, reference
from product_cases import arbitrary_topology, moe_topology
from tolerances import assert_close

F32 = torch.float32
DroplessMoE, route, make_topology = bm.DroplessMoE, bm.route, bm.make_topology
ops = bm  # the public functional API


def _private():
    """PRIVATE HOOKS, the only ones in this file: the custom ops behind the public functions,
    which opcheck exercises one by one. Repoint these lines when ops.py, routing.py and
    topology.py are reorganised (issue 10)."""
    from blocksparse_moe.ops import activation, permute, products
    from blocksparse_moe.routing import _checked_expert_ids, _route, padded_block_rows
    from blocksparse_moe.topology import _topology

    return SimpleNamespace(
        route=_route.op, padded_block_rows=padded_block_rows.op, topology=_topology.op,
        checked_expert_ids=_checked_expert_ids.op, meta=products._meta, product=products._product.op,
        invert_rows=permute._permute_invert_rows, invert_rows_op=permute._permute_invert_rows.op,
        gather=permute._permute_gather.op, scatter=permute._permute_scatter.op,
        scatter_wgrad=permute._permute_scatter_wgrad.op, glu_forward=activation._glu_forward.op,
        glu_backward=activation._glu_backward.op, glu_backward_packed=activation._glu_backward_packed.op)

# Dynamo's own tracing (not this package) touches torch.jit.script_method.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# -- opcheck: every op's fake matches its implementation --------------------------------------

def _routing_samples():
    p = _private()
    ids = torch.randint(0, 4, (13, 2), generator=_gen(0))
    r = route(ids, 4, 16)
    pb = torch.tensor([16, 16, 48], dtype=torch.int32)  # an empty expert in the middle
    return [
        pytest.param(p.route, (ids, 4, 16), id="route-int64"),
        pytest.param(p.route, (ids.to(torch.int32), 8, 32), id="route-int32-empty-experts"),
        pytest.param(p.route, (ids[:0], 4, 16), id="route-no-tokens"),
        pytest.param(p.padded_block_rows, (r.padded_bins, 16), id="padded_block_rows"),
        pytest.param(p.topology, (pb, 3, 32, 16, 48), id="topology"),
        pytest.param(p.topology, (pb.new_zeros(2), 2, 64, 32, 0), id="topology-no-tokens"),
        pytest.param(p.checked_expert_ids, (ids.to(torch.int32), 4, "Router"), id="checked_expert_ids"),
    ]


@pytest.mark.parametrize("op, args", _routing_samples())
def test_opcheck_routing_ops(op, args):
    torch.library.opcheck(op, args)


def _product_samples(device):
    p = _private()
    meta = p.meta
    out = {}
    for name, topo in (("moe", moe_topology([5, 0, 20], 32, 16).to(device)), ("coo", arbitrary_topology().to(device))):
        (m, n), b = topo.shape, topo.block_size
        a = torch.randn(m, 24, generator=_gen(1)).to(device)
        bt = torch.randn(n, 24, generator=_gen(2)).to(device).t()  # a transposed view: strides (1, 24)
        data = torch.randn(topo.nnz, b, b, generator=_gen(3)).to(device)
        # Grouped operands (an expert weight stack read in place): sdd's b [G, K, C] as the
        # transpose of a contiguous [G, C, K]; dsd's b [G, R, N] likewise, for S and S^T.
        gb = torch.randn(n // b, b, 24, generator=_gen(10)).to(device).transpose(1, 2)
        gd = torch.randn(n // b, 20, b, generator=_gen(11)).to(device).transpose(1, 2)
        gdt = torch.randn(m // b, 20, b, generator=_gen(12)).to(device).transpose(1, 2)
        out.update({
            f"sdd-grouped-{name}": (p.product, ("sdd", a, gb, *meta(topo), b)),
            f"dsd-grouped-{name}": (p.product, ("dsd", data, gd, *meta(topo), False)),
            f"dsd-grouped-transposed-{name}": (p.product, ("dsd", data, gdt, *meta(topo), True)),
        })
        out.update({
            f"sdd-{name}": (p.product, ("sdd", a, bt, *meta(topo), b)),
            f"dsd-{name}": (p.product, ("dsd", data, torch.randn(n, 20).to(device), *meta(topo), False)),
            f"dsd-transposed-{name}": (p.product, ("dsd", data, torch.randn(m, 20).to(device), *meta(topo), True)),
            f"dds-{name}": (p.product, ("dds", torch.randn(20, m).to(device), data, *meta(topo), False)),
            f"dds-transposed-{name}": (p.product, ("dds", torch.randn(20, n).to(device), data, *meta(topo), True)),
        })
    return out


def _permute_samples(device):
    k, h = 2, 24
    r = route(torch.randint(0, 3, (11, k), generator=_gen(4)).to(device), 3, 16)
    p = r.padded_tokens
    x = torch.randn(11, h, generator=_gen(5)).to(device)
    y = torch.randn(p, h, generator=_gen(6)).to(device)
    w = torch.rand(11, k, generator=_gen(7)).to(device)
    q = _private()
    row_slots = q.invert_rows(r.padded_rows, p)
    return {
        "invert_rows": (q.invert_rows_op, (r.padded_rows, p)),
        "gather": (q.gather, (x, row_slots, k, None)),
        "gather-weighted": (q.gather, (x, row_slots, k, w)),
        "scatter": (q.scatter, (y, r.padded_rows, k, None)),
        "scatter-weighted": (q.scatter, (y, r.padded_rows, k, w)),
        "scatter_wgrad": (q.scatter_wgrad, (x, y, r.padded_rows, k, F32)),
    }


def _activation_samples(device):
    packed = torch.randn(3, 2 * 40, generator=_gen(8)).to(device)
    gate, up = packed[:, :40], packed[:, 40:]  # the packed GLU's halves: row stride 80
    dout = torch.randn(3, 40, generator=_gen(9)).to(device)
    p = _private()
    return {
        "glu_forward-silu-strided": (p.glu_forward, (gate, up, 0)),
        "glu_forward-gelu-no-up": (p.glu_forward, (dout, None, 1)),
        "glu_backward-gelu_tanh": (p.glu_backward, (dout, gate, up, 2)),
        "glu_backward-relu-no-up": (p.glu_backward, (dout, gate, None, 3)),
        "glu_backward_packed": (p.glu_backward_packed, (dout, packed, 0)),
    }


_DATA_OPS = {
    _product_samples: [f"{op}-{t}" for t in ("moe", "coo")
                       for op in ("sdd", "dsd", "dsd-transposed", "dds", "dds-transposed",
                                  "sdd-grouped", "dsd-grouped", "dsd-grouped-transposed")],
    _permute_samples: ["invert_rows", "gather", "gather-weighted", "scatter", "scatter-weighted", "scatter_wgrad"],
    _activation_samples: ["glu_forward-silu-strided", "glu_forward-gelu-no-up", "glu_backward-gelu_tanh",
                          "glu_backward-relu-no-up", "glu_backward_packed"],
}


@pytest.mark.parametrize("family, case", [pytest.param(f, c, id=c) for f, cases in _DATA_OPS.items() for c in cases])
def test_opcheck_data_ops(path, family, case):
    op, args = family(path)[case]
    torch.library.opcheck(op, args)


# -- compiled layers ------------------------------------------------------------------------

H = 32


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("load_balancing_coef", 0.01)
    kw.setdefault("z_loss_coef", 0.001)
    return DroplessMoE(H, kw.pop("ffn", 32), kw.pop("experts", 4), kw.pop("top_k", 2), **kw)


def _step(fn, layer, x, expert_indices=None, dynamic=False):
    """Forward + backward of ``fn`` (``layer`` or its compiled form); ``(out, aux, grads)``
    with the gradients of x and of every parameter of ``layer``. ``dynamic``: mark T dynamic."""
    x = x.detach().requires_grad_(True)
    if dynamic:
        torch._dynamo.mark_dynamic(x, 0)
    out, aux = fn(x, expert_indices)
    gout = torch.randn(out.shape, generator=_gen(1))
    ((out * gout).sum() + aux.aux_loss).backward()
    grads = {"x": x.grad}
    for name, p in layer.named_parameters():
        grads[name] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    layer.zero_grad(set_to_none=True)
    return out.detach(), aux, grads


def _reference_step(layer, x, expert_indices=None):
    """``_step``'s results from ``reference.moe_reference`` on float64 copies of the layer and
    of x: ``(out, aux dict, grads)``, with the reference's own top-k choice unless
    ``expert_indices`` is given (inputs are random: no near-ties at these seeds)."""
    layer64 = copy.deepcopy(layer).to(torch.float64)
    x64 = x.detach().double().requires_grad_(True)
    ref = reference.moe_reference(x64, **layer64.reference_weights(), expert_indices=expert_indices)
    gout = torch.randn(ref["out"].shape, generator=_gen(1)).double()  # the same draw as _step's
    lc, zc = layer.router.load_balancing_coef, layer.router.z_loss_coef
    aux_loss = lc * ref["load_balancing_loss"] + zc * ref["z_loss"]
    ((ref["out"] * gout).sum() + aux_loss).backward()
    grads = {"x": torch.zeros_like(x64) if x64.grad is None else x64.grad}
    for name, p in layer64.named_parameters():
        grads[name] = torch.zeros_like(p) if p.grad is None else p.grad
    aux = dict(aux_loss=aux_loss, load_balancing_loss=ref["load_balancing_loss"], z_loss=ref["z_loss"],
               expert_weights=ref["weights"], router_logits=ref["logits"], expert_indices=ref["indices"])
    return ref["out"].detach(), aux, grads


def _assert_matches_reference(step, ref, msg=""):
    """One run (compiled or eager) of ``_step`` against ``_reference_step``."""
    (out, aux, grads), (out_r, aux_r, grads_r) = step, ref
    assert_close(out, out_r, F32, "layer", msg=f"{msg} out")
    for name in ("aux_loss", "load_balancing_loss", "z_loss", "router_logits"):
        assert_close(getattr(aux, name), aux_r[name], F32, "layer", msg=f"{msg} aux.{name}")
    # the same experts with the same weights, each token's k choices compared in expert order
    got_ids, got_order = aux.expert_indices.sort(dim=1)
    want_ids, want_order = aux_r["expert_indices"].sort(dim=1)
    assert torch.equal(got_ids, want_ids), msg
    assert_close(aux.expert_weights.gather(1, got_order), aux_r["expert_weights"].gather(1, want_order), F32,
                 "layer", msg=f"{msg} aux.expert_weights")
    counts = torch.bincount(aux_r["expert_indices"].reshape(-1), minlength=aux.tokens_per_expert.numel())
    assert torch.equal(aux.tokens_per_expert.long(), counts), msg
    assert grads.keys() == grads_r.keys()
    for name in grads_r:
        assert_close(grads[name], grads_r[name], F32, "layer", msg=f"{msg} d {name}")


def _assert_same(compiled, eager, ref, msg=""):
    """The compiled and the eager run, each against the float64 reference."""
    _assert_matches_reference(compiled, ref, msg=f"{msg} compiled")
    _assert_matches_reference(eager, ref, msg=f"{msg} eager")


LAYERS = [
    pytest.param(dict(glu=True, bias=True, shared_expert_size=32, shared_expert_gate=True, block_size=16),
                 id="glu-bias-shared-gate-b16"),
    pytest.param(dict(glu=False, bias=True, shared_expert_size=16, activation="gelu", block_size=32),
                 id="mlp-bias-shared-gelu-b32"),
]


@pytest.mark.parametrize("cfg", LAYERS)
def test_compiled_layer_matches_eager(cfg):
    with backend.prefer_on_cpu("cpu"):
        layer = _layer(**cfg)
        x = torch.randn(37, H, generator=_gen(2))  # not a multiple of a block: padded groups
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(layer, fullgraph=True, backend=counter)
        _assert_same(_step(compiled, layer, x), _step(layer, layer, x), _reference_step(layer, x))
        assert counter.frame_count == 1  # one graph: forward and backward of the whole layer


def test_compiled_layer_dynamic_token_count():
    # T marked dynamic: P and the topology's nnz are unbacked sizes made inside the graph,
    # so other token counts (and other routings) run the same graph without recompiling.
    with backend.prefer_on_cpu("cpu"):
        layer = _layer(glu=True, bias=True, shared_expert_size=16, block_size=16)
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(layer, fullgraph=True, backend=counter)
        for tokens in (24, 53, 5):
            x = torch.randn(tokens, H, generator=_gen(tokens))
            compiled_step = _step(compiled, layer, x, dynamic=tokens == 24)  # only the first call marks it
            _assert_same(compiled_step, _step(layer, layer, x), _reference_step(layer, x), msg=f"T={tokens}")
        assert counter.frame_count == 1


@pytest.mark.parametrize("kind", ["one-expert-takes-all", "zero-tokens"])
def test_compiled_layer_edge_cases(kind):
    with backend.prefer_on_cpu("cpu"):
        layer = _layer(experts=4, top_k=1, glu=True, block_size=16)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        if kind == "zero-tokens":  # no block rows at all (P = 0)
            x, ids = torch.randn(0, H), None
        else:  # three experts without a token
            x, ids = torch.randn(21, H, generator=_gen(3)), torch.full((21, 1), 2)
        _assert_same(_step(compiled, layer, x, ids), _step(layer, layer, x, ids), _reference_step(layer, x, ids),
                     msg=kind)


def test_compiled_layer_inductor():
    # The default backend: Inductor generates C++ for the torch ops around the custom ops.
    with backend.prefer_on_cpu("cpu"):
        layer = _layer(experts=4, top_k=2, glu=True, bias=True, shared_expert_size=16, block_size=16)
        x = torch.randn(19, H, generator=_gen(4))
        compiled = torch.compile(layer, fullgraph=True)
        _assert_same(_step(compiled, layer, x), _step(layer, layer, x), _reference_step(layer, x))


def test_compiled_layer_without_fullgraph():
    # Plain torch.compile breaks the graph where the data-dependent P is made (unless
    # capture_dynamic_output_shape_ops is set); the pieces still give eager's results.
    with backend.prefer_on_cpu("cpu"):
        layer = _layer(glu=False, block_size=16)
        x = torch.randn(30, H, generator=_gen(5))
        _assert_same(_step(torch.compile(layer, backend="aot_eager"), layer, x), _step(layer, layer, x),
                     _reference_step(layer, x))
        torch._dynamo.reset()
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            assert torch._dynamo.explain(layer)(x).graph_break_count == 0


def test_compiled_layer_checks_expert_ids():
    layer = _layer(block_size=16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    ids = torch.zeros(8, 2, dtype=torch.long)
    ids[3, 1] = 4
    with pytest.raises(ValueError, match=r"Router: expert_indices must lie in \[0, 4\), got values in \[0, 4\]"):
        compiled(torch.randn(8, H), ids)


# -- compiled functional ops ----------------------------------------------------------------

E, K_TOP, F_FFN, B = 3, 2, 32, 16


def _pipeline(x, ids, w1, w2, weights):
    """route + padded_gather + sdd + activation + dsd + dds + padded_scatter, one function."""
    r = route(ids, E, B, ffn_hidden_size=F_FFN)
    xp = ops.padded_gather(x, r, K_TOP)
    h = ops.sparse_activation(ops.sdd(xp, w1, r.topology), "gelu")
    y = ops.dsd(h, w2)
    side = ops.dds(xp.t(), h)  # [H, E*F]: the transposed-metadata product
    return ops.padded_scatter(y, r, weights, K_TOP), side


def _pipeline_grouped(x, ids, w1, w2, weights):
    """``_pipeline`` on expert weight stacks read in place (grouped operands): ``w1 [E, H, F]``
    is the SDD's b grouped along N, ``w2 [E, H, F]`` (transformers' down_proj layout) is
    read as ``[E, F, H]``, the DSD's b grouped along K (no 2-D view of it exists)."""
    return _pipeline(x, ids, w1, w2.transpose(1, 2), weights)


def _unpadded(x, ids, weights):
    """route without a topology: P comes from the padded_block_rows op under compile."""
    r = route(ids, E, B)
    out = ops.padded_scatter(ops.padded_gather(x, r, K_TOP) * 2, r, weights, K_TOP)
    return out + ops.scatter(ops.gather(x, r, K_TOP), r, None, K_TOP)


def _reference_routing(ids):
    """What the permute references read of a Routing, from ``reference.routing_reference``."""
    r = reference.routing_reference(ids, E, B)
    return SimpleNamespace(top_k=K_TOP, rows=r["rows"], padded_rows=r["padded_rows"], num_tokens=ids.shape[0],
                           padded_tokens=int(r["padded_bins"][-1]), padded_bins=r["padded_bins"])


def _pipeline_reference(x, ids, w1, w2, weights):
    """``_pipeline`` from reference.py alone (2-D weights ``w1 [H, E*F]``, ``w2 [E*F, H]``)."""
    r = _reference_routing(ids)
    topo = reference.topology_reference(r.padded_bins, E, F_FFN, B)
    xp = reference.padded_gather(x, r, K_TOP)
    h = reference.activation_reference(reference.sdd_reference(xp, w1, topo), "gelu")  # on the stored blocks
    y = reference.dsd_reference(h, w2, topo)
    side = reference.dds_reference(xp.t(), h, topo)
    return reference.padded_scatter(y, r, weights, K_TOP), side


def _pipeline_grouped_reference(x, ids, w1, w2, weights):
    """``_pipeline_grouped``'s stacks ``[E, H, F]`` read as the 2-D operands they stand for."""
    return _pipeline_reference(x, ids, torch.cat(list(w1), dim=1), torch.cat(list(w2.transpose(1, 2)), dim=0),
                               weights)


def _unpadded_reference(x, ids, weights):
    r = _reference_routing(ids)
    out = reference.padded_scatter(reference.padded_gather(x, r, K_TOP) * 2, r, weights, K_TOP)
    return out + reference.scatter(reference.gather(x, r, K_TOP), r, None, K_TOP)


def _functional_inputs(device, tokens=13):
    g = _gen(6)
    x = torch.randn(tokens, 16, generator=g)
    ids = torch.randint(0, E, (tokens, K_TOP), generator=g)
    w1 = torch.randn(16, E * F_FFN, generator=g) / 4
    w2 = torch.randn(E * F_FFN, 16, generator=g) / 8
    weights = torch.rand(tokens, K_TOP, generator=g)
    return [t.to(device) for t in (x, ids, w1, w2, weights)]


def _value_and_grads(fn, inputs, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype if t.is_floating_point() else t.dtype).requires_grad_(t.is_floating_point())
              for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * torch.randn(o.shape, generator=_gen(i)).to(o.device, o.dtype)).sum() for i, o in enumerate(outs))
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves if t.is_floating_point()]


@pytest.mark.parametrize("fn, ref_fn", [(_pipeline, _pipeline_reference),
                                        (_pipeline_grouped, _pipeline_grouped_reference),
                                        (_unpadded, _unpadded_reference)],
                         ids=["products", "products-grouped-weights", "permutes-no-topology"])
def test_compiled_functional_ops(path, fn, ref_fn):
    inputs = _functional_inputs(path)
    if fn is _unpadded:
        inputs = [inputs[0], inputs[1], inputs[4]]
    if fn is _pipeline_grouped:  # the same values as expert stacks [E, H, F], contiguous
        w1, w2 = inputs[2], inputs[3]
        inputs[2] = w1.view(16, E, F_FFN).transpose(0, 1).contiguous()
        inputs[3] = w2.view(E, F_FFN, 16).transpose(1, 2).contiguous()
    counter = CompileCounterWithBackend("aot_eager")
    outs_c, grads_c = _value_and_grads(torch.compile(fn, fullgraph=True, backend=counter), inputs)
    outs_e, grads_e = _value_and_grads(fn, inputs)
    assert counter.frame_count == 1
    outs_r, grads_r = _value_and_grads(ref_fn, [t.cpu() for t in inputs], torch.float64)
    assert len(outs_c) == len(outs_r) and len(grads_c) == len(grads_r)
    # a chain of fp32 products and permutes: the "layer" entry
    for got in (outs_c + grads_c, outs_e + grads_e):
        for i, (a, b) in enumerate(zip(got, outs_r + grads_r)):
            assert_close(a, b, F32, "layer", msg=f"output/gradient {i}")


def test_compiled_route_checks_expert_ids():
    compiled = torch.compile(lambda ids: route(ids, 4, 16).tokens_per_expert, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(torch.tensor([[0, 3], [3, 1]])), torch.tensor([1, 1, 0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"route: expert_indices must lie in \[0, 4\), got values in \[-1, 3\]"):
        compiled(torch.tensor([[0, 3], [-1, 1]]))


def test_make_topology_takes_a_known_padded_tokens():
    r = route(torch.tensor([[0], [0], [2]]), 3, 16)
    topo = make_topology(r.padded_bins, 3, 32, 16, padded_tokens=32)
    want = reference.topology_reference([16, 16, 32], 3, 32, 16)  # experts 0 and 2: one block row each
    assert topo.shape == want["shape"] == (32, 96) and topo.nnz == 4
    for name in reference.TOPOLOGY_FIELDS:
        assert torch.equal(getattr(topo, name), want[name]), name
    with pytest.raises(ValueError, match=r"padded_tokens=48 but padded_bins\[-1\] = 32"):
        make_topology(r.padded_bins, 3, 32, 16, padded_tokens=48)
    with pytest.raises(ValueError, match="must be a non-negative multiple of block_size"):
        make_topology(r.padded_bins, 3, 32, 16, padded_tokens=20)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_opcheck_expert_path_backward_strides(path, layout):
    """The fused path's backward op: its fake gives the real outputs' strides (issue 18), also
    for an x and router weights that are transposed views and w1/w2 seen through other
    layouts (the fake used empty_like(x), which keeps a transposed x's strides; both back
    ends return a row-major dx)."""
    g = _gen(21)
    tokens, hidden, ffn, experts, k = 7, 24, 16, 3, 2
    x = torch.randn(hidden, tokens, generator=g).t() if layout == "strided" else torch.randn(tokens, hidden,
                                                                                            generator=g)
    weights = torch.rand(k, tokens, generator=g).t() if layout == "strided" else torch.rand(tokens, k, generator=g)
    w1 = torch.randn(experts, hidden, 2 * ffn, generator=g).transpose(1, 2)
    w2 = torch.randn(hidden, experts, ffn, generator=g).permute(1, 2, 0) if layout == "strided" else \
        torch.randn(experts, ffn, hidden, generator=g)
    b1, b2 = torch.randn(experts, 2 * ffn, generator=g), torch.randn(experts, hidden, generator=g)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    x, weights, w1, w2, b1, b2, ids = (t.to(path) for t in (x, weights, w1, w2, b1, b2, ids))
    out, *saved = torch.ops.blocksparse_moe.experts_forward(x, ids, weights, w1, w2, b1, b2, experts, "silu", True,
                                                            16, True)
    dout = torch.randn(tokens, hidden, generator=g).to(path)
    args = (dout, saved, x, ids, weights, w1, w2, b1, b2, experts, "silu", True, 16, [True] * 6)
    torch.library.opcheck(torch.ops.blocksparse_moe.experts_backward.default, args,
                          test_utils=("test_faketensor",))
