"""Which GPU a launch runs on, and what an unusable driver does.

* Every Triton launch runs under ``torch.cuda.device`` of its tensors (``_common.launch``;
  tests/test_compile_targets.py checks that no launch bypasses it). On two GPUs a layer on
  cuda:1 must give what the same layer gives on cuda:0, while cuda:0 stays current.
* A ``_C`` built with CUDA 13 on a driver older than 580: one warning naming the driver
  version needed, then routing runs in torch (same results).
"""

import warnings

import pytest
import torch

from blocksparse_moe import native as _native
from blocksparse_moe.kernels import _common
from blocksparse_moe.moe import DroplessMoE
from tolerances import assert_close


def test_device_guard_is_the_tensors_device():
    # The CPU twin of the two-GPU test: the guard a launch enters is its tensors' device.
    guard = _common.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with _common.device_guard(torch.device("cpu")):  # a no-op for CPU tensors
        pass


class _OldDriver:
    """Stands in for a _C built with CUDA 13.0 on a machine whose driver supports 12.8."""

    route_cuda = object()

    def cuda_versions(self):
        return 13000, 12080


def test_old_driver_falls_back_with_a_clear_warning(monkeypatch):
    monkeypatch.setattr(_native, "_C", _OldDriver())
    monkeypatch.setattr(_native, "_load_attempted", True)
    monkeypatch.setattr(_native, "_cuda_unusable", None)
    monkeypatch.setattr(_native, "_warned", set())
    monkeypatch.delenv("BLOCKSPARSE_MOE_REQUIRE_NATIVE", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _native._ops_for(torch.device("cuda"), "route") is None
    (w,) = caught
    assert "supports CUDA 12.8" in str(w.message) and "built with CUDA 13.0" in str(w.message)
    assert "driver >= 580" in str(w.message) and "runs in torch" in str(w.message)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_layer_on_second_gpu_matches_first(dtype):
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    layers = {}
    for index in (0, 1):
        layers[index] = DroplessMoE(256, 256, 8, 2, block_size=64, bias=True, dtype=dtype,
                                    device=f"cuda:{index}")
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(333, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = {}
    for index, layer in layers.items():
        xi = x.to(f"cuda:{index}").requires_grad_(True)
        out, aux = layer(xi)
        (out.float().square().sum() + aux.aux_loss).backward()
        results[index] = [out.detach().cpu(), xi.grad.cpu()] + [p.grad.cpu() for p in layer.parameters()]
    assert torch.cuda.current_device() == 0  # the guard restored the current device
    for got, want in zip(results[1], results[0]):
        assert_close(got, want, dtype, "layer")
