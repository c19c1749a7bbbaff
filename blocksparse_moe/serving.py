"""What one serving call costs, measured without a GPU (DESIGN.md, "Serving sizes" and "Costs").

:func:`serving_costs` runs ``fn()`` (a forward on CPU tensors) with the Triton launchers
interpreted (``TRITON_INTERPRET=1`` set before ``blocksparse_moe`` was imported) and reports
what that call would cost on a GPU of compute capability ``capability``:

    triton_launches  Triton kernel launches (every one, intercepted at Triton's interpreter,
                     ``InterpretedFunction.run``, as ``tests/compile_targets.py`` does)
    torch_kernels    torch ops that launch a kernel on a GPU, counted through a
                     ``TorchDispatchMode``: every aten op except views and metadata ops
                     (``view``, ``slice``, ``detach``, ``set_``, size queries, ...), bare
                     allocations (``empty*``, ``new_empty*``: no kernel) and host reads
                     (counted below). Fills (``full``, ``zeros``, ``zero_``, ``fill_``) and
                     copies (``copy_``, ``_to_copy``, ``clone``) count.
    launches         the sum of the two
    ctas_launched    per Triton launch, the CTAs its grid starts with each config the target
                     would compile (``Tiles.variants(capability)``: the grid lambda evaluated
                     with each config's meta-parameters), the FEWEST over those configs,
                     summed over launches (ties: the first config of the target's table). A
                     fixed launch (``_common.launch`` without ``Tiles``) counts its grid as given.
    ctas_real        of those, for the same config, the CTAs whose row tile holds at least
                     one real row (rule below)
    fresh_bytes      bytes of every new storage (``costs.count_host_reads``), the Triton
                     interpreter's own copies of the kernel arguments left out
    host_reads       reads of device data by the host (``costs.count_host_reads``)

Which CTAs hold a real row is decided by the kernel's parameter NAMES, in one table,
:data:`ROW_RULES` (the first rule whose parameters the kernel has wins):

    row-tiled        ``row_slots_ptr``, ``block_expert_ptr`` and ``BLOCK_M``: grid axis 0 tiles the padded
                     rows in tiles of the constexpr ``BLOCK_M`` rows; CTA ``(i, *, *)`` covers
                     rows ``[i*BLOCK_M, (i+1)*BLOCK_M)`` of ``row_slots`` and is real when one of
                     them holds a slot (``row_slots[row] >= 0``); axes 1 and 2 count alike.
    row-banded       ``row_slots_ptr``, ``expert_offsets_ptr``, ``BAND_ROWS`` and ``BLOCK_M`` (the
                     fused up, down and act_bwd kernels): the same count as row-tiled. Each
                     CTA remaps its id to one row tile and column tile (expert by expert, in
                     bands), one to one over the tiles of the real rows; the rest exit.
    expert-chunks    ``expert_offsets_ptr``, ``row_slots_ptr``, ``CHUNK``, ``C`` and ``BLOCK_M`` (the
                     weight gradients, kernels/expert_wgrad.py): axis 0 is ``slot * tiles +
                     tile`` with ``tiles = C / BLOCK_M`` over E + X chunk slots; a CTA is real
                     when its chunk (``CHUNK`` rows of one expert's range) holds a real row.
    expert-ranges    ``expert_offsets_ptr``, ``row_slots_ptr`` and ``BLOCK_M`` (one program row per expert):
                     axis 0 is ``e * tiles + tile`` with ``tiles = grid[0] / E``; a CTA is real
                     when expert ``e``'s rows ``[expert_offsets[e], expert_offsets[e+1])`` hold
                     a real row.
    any other kernel every CTA is real (the routing kernels, which write ``row_slots`` and
                     ``block_expert`` but tile no rows, have no ``BLOCK_M``).

``row_slots``, ``block_expert`` and ``expert_offsets`` are read from the launch's own tensor
arguments right AFTER the launch (earlier launches of the same call may have written them;
the interpreter runs synchronously). A kernel whose grid becomes 1-D or persistent needs
one new entry in :data:`ROW_RULES`, nothing else.

``run_products=False`` records the launches of the kernels :data:`ROW_RULES` knows (the
products, which read the routing and never write it) without running them: the counts
stay exact (the launcher allocates and sizes everything before it launches) and a layer at
its real size costs seconds instead of hours in the interpreter, but their outputs hold
garbage. Every other launch (a routing kernel, say) runs. The weights may then be
zero-stride expands (``torch.empty(1, 1, 1).expand(E, 2F, H)``): nothing reads them.

:func:`floor_bytes` is the issue's floor of a forward: the rows every slot needs, ``h``
(``T*k x G*F``) and ``y`` (``T*k x H``), plus the output (``T x H``).

Usage::

    c = serving_costs(lambda: expert_mlp(x, ids, w, w1, w2, check_indices=False))
    c.ctas_launched, c.ctas_real, c.fresh_bytes, c.launches, c.host_reads
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import backend
from .costs import count_host_reads

__all__ = ["ServingCosts", "LaunchCosts", "ROW_RULES", "serving_costs", "floor_bytes"]


def floor_bytes(tokens: int, top_k: int, hidden: int, ffn: int, groups: int, dtype_bytes: int) -> int:
    """``(T*k*(G*F + H) + T*H) * bytes``: h and y of every slot, and the output."""
    return (tokens * top_k * (groups * ffn + hidden) + tokens * hidden) * dtype_bytes


# -- which CTAs hold a real row ---------------------------------------------------------------

def _real_row_tiles(row_slots: torch.Tensor, tiles: int, block_m: int) -> int:
    """How many of ``tiles`` consecutive tiles of ``block_m`` rows hold a slot >= 0."""
    real = row_slots.reshape(-1)[:tiles * block_m] >= 0
    if real.numel() < tiles * block_m:  # a grid past the buffer: those rows are not real
        real = torch.cat([real, real.new_zeros(tiles * block_m - real.numel())])
    return int(real.view(tiles, block_m).any(1).sum())


def _row_tiled(grid: Tuple[int, int, int], meta: Dict[str, object]) -> int:
    return _real_row_tiles(meta["row_slots_ptr"], grid[0], int(meta["BLOCK_M"])) * grid[1] * grid[2]


def _expert_ranges(grid: Tuple[int, int, int], meta: Dict[str, object]) -> int:
    offsets = meta["expert_offsets_ptr"].reshape(-1).tolist()
    experts = len(offsets) - 1
    if experts < 1 or grid[0] % experts:
        raise ValueError(f"serving_costs: expert-ranges rule: grid axis 0 = {grid[0]} is not a multiple of "
                         f"E = {experts}; the kernel's grid changed, update serving.ROW_RULES")
    real = meta["row_slots_ptr"].reshape(-1) >= 0
    hit = sum(1 for e in range(experts) if bool(real[offsets[e]:offsets[e + 1]].any()))
    return hit * (grid[0] // experts) * grid[1] * grid[2]


def _expert_chunks(grid: Tuple[int, int, int], meta: Dict[str, object]) -> int:
    offsets = meta["expert_offsets_ptr"].reshape(-1).tolist()
    experts = len(offsets) - 1
    chunk, tiles = int(meta["CHUNK"]), int(meta["C"]) // int(meta["BLOCK_M"])
    if experts < 1 or chunk < 1 or tiles < 1 or grid[0] % tiles or grid[0] // tiles < experts:
        raise ValueError(f"serving_costs: expert-chunks rule: grid axis 0 = {grid[0]} is not (E + X) * C/BLOCK_M "
                         f"with E = {experts}, C/BLOCK_M = {tiles}; the kernel's grid changed, update "
                         f"serving.ROW_RULES")
    real = meta["row_slots_ptr"].reshape(-1) >= 0
    hit = sum(1 for e in range(experts) for lo in range(offsets[e], offsets[e + 1], chunk)
              if bool(real[lo:min(offsets[e + 1], lo + chunk)].any()))
    return hit * tiles * grid[1] * grid[2]


# (rule name, parameter names the kernel must have, real CTAs of (grid, meta)). ``meta``
# holds the launch's arguments by parameter name (its tensors as passed) and the config's
# constexprs. The first match wins; a kernel matching none: every CTA is real.
ROW_RULES: List[Tuple[str, Tuple[str, ...], Callable[[Tuple[int, int, int], Dict[str, object]], int]]] = [
    ("row-tiled", ("row_slots_ptr", "block_expert_ptr", "BLOCK_M"), _row_tiled),
    ("row-banded", ("row_slots_ptr", "expert_offsets_ptr", "BAND_ROWS", "BLOCK_M"), _row_tiled),
    ("expert-chunks", ("expert_offsets_ptr", "row_slots_ptr", "CHUNK", "C", "BLOCK_M"), _expert_chunks),
    ("expert-ranges", ("expert_offsets_ptr", "row_slots_ptr", "BLOCK_M"), _expert_ranges),
]


def _rule_of(params: Sequence[str]):
    return next((r for r in ROW_RULES if all(p in params for p in r[1])), None)


# -- the counters -------------------------------------------------------------------------------

# Ops that launch no kernel: metadata, aliasing, bare allocations.
_NO_KERNEL = frozenset({
    "empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided",
    "set_", "resize_", "resize_as_", "detach", "alias", "lift_fresh", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "is_contiguous", "is_same_size", "_local_scalar_dense", "prim_layout", "prim_device",
    "record_stream",
})


class _TorchKernels(TorchDispatchMode):
    """Counts the aten ops that would launch a kernel on a GPU (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            name = func.overloadpacket.__name__
            if not (getattr(func, "is_view", False) or name in _NO_KERNEL):
                self.ops.append(str(func))
        return out


@dataclass
class LaunchCosts:
    """One Triton launch: its kernel, the config that starts the fewest CTAs on the target,
    its grid there, the CTAs launched and those with a real row, and the rule used."""

    kernel: str
    config: Dict[str, object]
    grid: Tuple[int, int, int]
    ctas_launched: int
    ctas_real: int
    rule: str


@dataclass
class ServingCosts:
    """One call's costs on the target (see the module docstring for each field)."""

    triton_launches: int = 0
    torch_kernels: int = 0
    ctas_launched: int = 0
    ctas_real: int = 0
    fresh_bytes: int = 0
    host_reads: int = 0
    host_read_ops: List[str] = field(default_factory=list)
    torch_ops: List[str] = field(default_factory=list)
    per_launch: List[LaunchCosts] = field(default_factory=list)

    @property
    def launches(self) -> int:
        return self.triton_launches + self.torch_kernels


def _grid3(grid) -> Tuple[int, int, int]:
    g = tuple(int(v) for v in grid)
    if not 1 <= len(g) <= 3:
        raise ValueError(f"serving_costs: a grid has 1 to 3 axes, got {g}")
    return g + (1,) * (3 - len(g))


def _candidates(plan, capability: Tuple[int, int], kernel: str) -> List[Dict[str, object]]:
    """The meta-parameter sets a launch of ``kernel`` (its function's name) would run with on
    the target: each config of ``Tiles.variants`` (a tiled product), else the launch's own."""
    from .kernels import _common

    if isinstance(plan, _common.Tiles):
        return [dict(v) for v in plan.variants(capability, kernel=kernel)]
    return [{}]


def _launch_costs(kernel_name: str, params: Sequence[str], bound: Dict[str, object], grid, plan,
                  capability: Tuple[int, int]) -> LaunchCosts:
    rule = _rule_of(params)
    best: Optional[LaunchCosts] = None
    for variant in _candidates(plan, capability, kernel_name.rpartition(".")[2]):
        meta = {**bound, **variant}
        g = _grid3(grid(meta) if callable(grid) else grid)
        n = g[0] * g[1] * g[2]
        if best is None or n < best.ctas_launched:
            config = {k: v for k, v in variant.items() if k not in ("INTERPRET", "INPUT_PRECISION")}
            best = LaunchCosts(kernel_name, config, g, n, -1, rule[0] if rule else "all")
            best_meta = meta
    best.ctas_real = rule[2](best.grid, best_meta) if (rule and best.ctas_launched) else best.ctas_launched
    return best


def serving_costs(fn: Callable[[], object], capability: Tuple[int, int] = (9, 0), *,
                  run_products: bool = True) -> ServingCosts:
    """Run ``fn()`` once on the interpreted Triton back end and count what it would cost on a
    GPU of ``capability`` (see the module docstring). ``run_products=False``: the launches of
    the kernels :data:`ROW_RULES` knows are counted but not run (their outputs are garbage).
    """
    from triton.runtime.interpreter import InterpretedFunction

    from .kernels import _common

    if not backend.interpreter_enabled():
        raise RuntimeError("serving_costs needs TRITON_INTERPRET=1 set before blocksparse_moe is imported")
    result = ServingCosts()
    torch_kernels = _TorchKernels()
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        fn_ = self.fn
        params = list(inspect.signature(fn_).parameters)
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        plan = _common._LAUNCHING.get()
        # The interpreter copies arguments through torch ops; a GPU would not: neither they
        # nor this bookkeeping count.
        fresh, reads, n_reads = counter.fresh_bytes, counter.host_reads, len(counter.reads)
        torch_kernels.paused = True
        try:
            if run_products or _rule_of(params) is None:
                original(self, *args, grid=grid, warmup=warmup, **kwargs)
            result.per_launch.append(_launch_costs(f"{fn_.__module__}.{fn_.__qualname__}", params, bound, grid,
                                                   plan, capability))
        finally:
            torch_kernels.paused = False
            counter.fresh_bytes, counter.host_reads = fresh, reads
            del counter.reads[n_reads:]

    InterpretedFunction.run = run
    try:
        with backend.prefer_on_cpu("interpreter"), count_host_reads() as counter, torch_kernels:
            fn()
    finally:
        InterpretedFunction.run = original
    result.triton_launches = len(result.per_launch)
    result.ctas_launched = sum(l.ctas_launched for l in result.per_launch)
    result.ctas_real = sum(l.ctas_real for l in result.per_launch)
    result.torch_ops = list(torch_kernels.ops)
    result.torch_kernels = len(result.torch_ops)
    result.fresh_bytes = counter.fresh_bytes
    result.host_reads = counter.host_reads
    result.host_read_ops = list(counter.reads)
    return result
