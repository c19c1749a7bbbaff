"""The costs of one training step that do not need a GPU to measure (DESIGN.md, "Costs").

    kept bytes     storage bytes saved for backward (``saved_tensors_hooks``), counted once
                   per storage, storages of excluded tensors (the input, the weights) left out
    fresh bytes    bytes of every new storage an op returns (outputs that alias no input:
                   ``empty``, products, copies, ...), forward and backward separately
    host reads     reads of tensor data by the host: ``.item()``/``int(t)``/``bool(t)``
                   (``aten._local_scalar_dense``), ops whose output size depends on the data
                   (``nonzero``, ``masked_select``, ``unique``, ``bincount``, ...) and
                   ``tolist``/``numpy``/``__array__`` calls made outside Triton's interpreter

On a GPU each host read is a synchronisation that stalls the launch queue and forbids
CUDA-graph capture; the fused layer promises none. Fresh bytes are the traffic proxy: every
fresh tensor is written once to memory (and usually read back once).

The counters see what goes through the torch dispatcher: native ops of ``_C`` and Triton
launches are invisible to them, but the buffers the launchers allocate are not. Tensors a
``torch.autograd.Function`` stores as ``ctx`` attributes bypass the saved-tensor hooks;
the package saves through ``ctx.save_for_backward`` only, so they count.

Usage::

    costs = measure_step(lambda: moe(x)[0], exclude=[x, *moe.parameters()])
    costs.kept_bytes, costs.fresh_forward_bytes, costs.host_reads_forward, ...
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Set

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["StepCosts", "measure_step", "count_host_reads"]

# aten ops that read device data on the host: a scalar read, or an output size that
# depends on the values.
_HOST_READ_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
    "unique_dim", "bincount", "argwhere", "is_nonzero", "equal",
})
_HOST_READ_METHODS = frozenset({"tolist", "numpy", "__array__", "item"})


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _called_from_triton() -> bool:
    # Triton's interpreter moves kernel arguments through numpy: that is the "device"
    # running a kernel, not the package reading data on the host.
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("triton"):
            return True
        frame = frame.f_back
    return False


class _Counter(TorchDispatchMode):
    """Counts fresh output bytes and host-reading ops."""

    def __init__(self) -> None:
        super().__init__()
        self.fresh_bytes = 0
        self.host_reads = 0
        self.reads: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _HOST_READ_OPS and not (name == "bincount" and _on_cpu(args)):
            self.host_reads += 1
            self.reads.append(name)
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        seen: Set[int] = set()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                key = _storage_key(t)
                if key and key not in inputs and key not in seen:
                    seen.add(key)
                    self.fresh_bytes += t.untyped_storage().nbytes()
        return out


def _on_cpu(args) -> bool:
    return all(t.device.type == "cpu" for t in tree_leaves(args) if isinstance(t, torch.Tensor))


class _MethodCounter(TorchFunctionMode):
    """Counts ``tolist``/``numpy``/``__array__``/``item`` calls (tolist reads without dispatch)."""

    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READ_METHODS and name != "item" and not _called_from_triton():
            self.counter.host_reads += 1
            self.counter.reads.append(name)
        return func(*args, **(kwargs or {}))


class count_host_reads:
    """Context manager: ``with count_host_reads() as c: ...; c.host_reads, c.fresh_bytes``."""

    def __enter__(self) -> _Counter:
        self._counter = _Counter()
        self._methods = _MethodCounter(self._counter)
        self._methods.__enter__()
        self._counter.__enter__()
        return self._counter

    def __exit__(self, *exc) -> None:
        self._counter.__exit__(*exc)
        self._methods.__exit__(*exc)


@dataclass
class StepCosts:
    """One forward + backward: see the module docstring for what each field counts."""

    kept_bytes: int
    fresh_forward_bytes: int
    fresh_backward_bytes: int
    host_reads_forward: int
    host_reads_backward: int
    host_read_ops: list

    @property
    def fresh_bytes(self) -> int:
        return self.fresh_forward_bytes + self.fresh_backward_bytes

    @property
    def host_reads(self) -> int:
        return self.host_reads_forward + self.host_reads_backward


def measure_step(forward: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = (),
                 grad: Optional[torch.Tensor] = None) -> StepCosts:
    """Run ``forward()`` then ``backward`` of its output once and count their costs.

    ``exclude``: tensors whose storages are not counted as kept (the input and the
    parameters: they exist whether or not the layer keeps them). ``grad``: the output
    gradient (ones by default, made before the backward is measured).
    """
    excluded = {_storage_key(t) for t in exclude if isinstance(t, torch.Tensor)}
    kept = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key and key not in excluded and t.device.type != "meta":
            kept[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with count_host_reads() as fwd:
            out = forward()
    if grad is None:
        grad = torch.ones_like(out)
    with count_host_reads() as bwd:
        out.backward(grad)
    return StepCosts(kept_bytes=sum(kept.values()), fresh_forward_bytes=fwd.fresh_bytes,
                     fresh_backward_bytes=bwd.fresh_bytes, host_reads_forward=fwd.host_reads,
                     host_reads_backward=bwd.host_reads, host_read_ops=fwd.reads + bwd.reads)
