"""What a hostile (or just unlucky) user hit: each test failed before its fix (issue 12).

* NaN / infinite / out-of-range float hyper-parameters of DroplessMoE and Router were
  accepted (``scaling_factor=nan`` made every output NaN);
* an empty batch with ``out.sum().backward()`` on the Triton kernels failed on the
  zero-stride gradient of ``.sum()``;
* ``m(x[:, ::2])`` and ``m(x.t())`` were rejected with an error about ``padded_gather``;
* ``python -m blocksparse_moe --device gpu`` ended in a raw traceback, and ``--json`` into a
  missing directory ran everything before failing.
"""

from __future__ import annotations

import math

import pytest
import torch

import blocksparse_moe.__main__ as main_job
from blocksparse_moe import DroplessMoE, Router, backend, reference
from tolerances import assert_close

BAD_FLOATS = [
    pytest.param("scaling_factor", float("nan"), id="nan-scaling"),
    pytest.param("scaling_factor", float("inf"), id="inf-scaling"),
    pytest.param("scaling_factor", 0.0, id="zero-scaling"),
    pytest.param("scaling_factor", -1.0, id="negative-scaling"),
    pytest.param("jitter_noise", float("nan"), id="nan-jitter"),
    pytest.param("jitter_noise", 1.0, id="jitter-one"),
    pytest.param("jitter_noise", -0.1, id="negative-jitter"),
    pytest.param("load_balancing_coef", float("inf"), id="inf-lb-coef"),
    pytest.param("load_balancing_coef", -0.01, id="negative-lb-coef"),
    pytest.param("z_loss_coef", float("nan"), id="nan-z-coef"),
    pytest.param("z_loss_coef", -1e-3, id="negative-z-coef"),
]


@pytest.mark.parametrize("name,value", BAD_FLOATS)
@pytest.mark.parametrize("owner", ["DroplessMoE", "Router"])
def test_float_hyper_parameters_are_checked(owner, name, value):
    with pytest.raises(ValueError, match=rf"{owner}: {name} must be a finite number"):
        if owner == "DroplessMoE":
            DroplessMoE(16, 16, 4, 2, block_size=16, **{name: value})
        else:
            Router(16, 4, 2, **{name: value})


@pytest.mark.parametrize("value", ["1.0", None, torch.tensor(1.0)], ids=["str", "none", "tensor"])
def test_float_hyper_parameters_must_be_numbers(value):
    with pytest.raises(TypeError, match="DroplessMoE: scaling_factor must be a real number"):
        DroplessMoE(16, 16, 4, 2, block_size=16, scaling_factor=value)


def test_expert_bias_rate_is_checked():
    r = Router(16, 4, 2, expert_bias=True)
    with pytest.raises(ValueError, match="rate must be a finite number"):
        r.update_expert_bias(torch.ones(4), rate=float("nan"))


def test_valid_float_hyper_parameters_still_work():
    m = DroplessMoE(16, 16, 4, 2, block_size=16, scaling_factor=2.5, jitter_noise=0.0, load_balancing_coef=0.01,
                    z_loss_coef=0.0)
    out, _ = m(torch.randn(5, 16))
    assert torch.isfinite(out).all()


def test_empty_batch_backward_through_sum(path):
    # out.sum() hands backward a zero-stride [0, H] gradient: no check may trip over it.
    torch.manual_seed(0)
    m = DroplessMoE(32, 32, 4, 2, block_size=16, bias=True, shared_expert_size=16).to(path)
    x = torch.randn(0, 32, device=path, requires_grad=True)
    out, aux = m(x)
    (out.sum() + aux.aux_loss).backward()
    assert out.shape == (0, 32) and x.grad.shape == (0, 32)
    for name, p in m.named_parameters():
        assert p.grad is None or not p.grad.any(), f"{name} got a gradient from zero tokens"


def test_permutes_empty_batch_backward_through_sum_triton():
    """The zero-stride [0, H] gradient of an empty .sum() reaches the permute kernels' checks."""
    from blocksparse_moe import padded_gather, padded_scatter, route

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    with backend.prefer_on_cpu("interpreter"):
        routing = route(torch.empty(0, 2, dtype=torch.int64, device=device), 4, 16)
        x = torch.randn(0, 32, device=device, requires_grad=True)
        padded_scatter(padded_gather(x, routing, 2), routing, None, 2).sum().backward()
    assert x.grad.shape == (0, 32)


@pytest.mark.parametrize("layout", ["every-other-column", "transposed"])
def test_any_strides(path, layout):
    """``m(x)`` for a non-contiguous x equals the float64 reference, gradients included."""
    torch.manual_seed(1)
    m = DroplessMoE(32, 32, 4, 2, block_size=16).to(path)
    base = torch.randn(12, 64, device=path) if layout == "every-other-column" else torch.randn(32, 12, device=path)
    leaf = base.clone().requires_grad_(True)
    x = leaf[:, ::2] if layout == "every-other-column" else leaf.t()
    assert x.shape == (12, 32) and not x.is_contiguous()
    out, aux = m(x)
    gout = torch.randn_like(out)
    (out * gout).sum().backward()

    x64 = x.detach().double().requires_grad_(True)
    import copy

    m64 = copy.deepcopy(m).double()
    ref = reference.moe_reference(x64, **m64.reference_weights(), expert_indices=aux.expert_indices)
    (ref["out"] * gout.double()).sum().backward()
    assert_close(out, ref["out"], torch.float32, "layer", "out")
    dx = leaf.grad[:, ::2] if layout == "every-other-column" else leaf.grad.t()
    assert_close(dx, x64.grad, torch.float32, "layer", "dx")
    if layout == "every-other-column":
        assert not leaf.grad[:, 1::2].any(), "the skipped columns got a gradient"
    assert_close(m.w1.grad, m64.w1.grad, torch.float32, "layer", "dw1")


# -- the main job's command line ------------------------------------------------------------------

def _no_work(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the main job started working before checking its arguments")
    monkeypatch.setattr(main_job, "build_layer", fail)
    monkeypatch.setattr(main_job, "check_layer", fail)


@pytest.mark.parametrize("argv,message", [
    pytest.param(["--device", "gpu"], "not a device torch knows", id="device-gpu"),
    pytest.param(["--device", "meta"], "only cpu and cuda", id="device-meta"),
    pytest.param(["--device", "cpu", "--json", "/no/such/dir/out.json"], "does not exist", id="json-missing-dir"),
    pytest.param(["--device", "cpu", "--json", "/"], "is a directory", id="json-is-a-directory"),
    pytest.param(["--device", "cpu", "--shapes", "no-such-shape"], "unknown shapes", id="unknown-shape"),
])
def test_main_job_checks_arguments_first(monkeypatch, capsys, argv, message):
    _no_work(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main_job.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_main_job_cuda_without_gpu(monkeypatch, capsys):
    _no_work(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main_job.main(["--device", "cuda"])
    assert exc.value.code == 2 and "no CUDA device is visible" in capsys.readouterr().err


def test_float_check_message_names_the_range():
    with pytest.raises(ValueError) as exc:
        DroplessMoE(16, 16, 4, 2, block_size=16, jitter_noise=math.nan)
    assert "jitter_noise" in str(exc.value) and "[0, 1)" in str(exc.value) and "nan" in str(exc.value)
