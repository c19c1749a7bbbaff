"""torch.library registration: every launcher entry point as a ``blocksparse_moe::`` custom op.

torch.compile cannot trace into the native routing ops, the Triton launchers or the
host reads that size the topology, so each of those entry points is registered as a
custom op (``torch.ops.blocksparse_moe.<name>``) with a *fake* implementation that gives
the output shapes, dtypes and strides without running anything. Dynamo then records one
opaque node per op and the compiled graph calls the real implementation, which picks the
back end through ``backend.select`` exactly as eager mode does.

The ops take only tensors, ints, bools, dtypes and None. They carry no autograd formula:
the ``torch.autograd.Function``s in ``ops.py`` call them in forward and backward, and
Dynamo traces those Functions (so every backward is made of the same ops).

Sizes that depend on data (``P``, the padded rows, and with it the topology's ``nnz``)
are *unbacked* symbolic sizes under compile. One op makes ``P`` per routing
(``blocksparse_moe::padded_block_rows``, an int output: ``P / b``, so the compiler knows
``P`` is a multiple of ``b``); ``Routing.known_padded_tokens`` carries it and every later
op (``topology``, ``invert_rows``, the products) takes its sizes from it, so all sizes of
one layer agree symbolically. Dynamo accepts such a size inside the graph with
``fullgraph=True`` (or ``torch._dynamo.config.capture_dynamic_output_shape_ops = True``);
plain ``torch.compile`` breaks the graph where ``P`` is made (a DroplessMoE becomes
four graphs) and gives the same results.

:func:`custom_op` returns a plain function, not the op: in eager mode it calls the
implementation directly (the dispatcher adds ~10 us per call, and a layer makes ~20
calls per step), under ``torch.compile`` it calls the registered op. Both run the same
code, so compiled and eager results agree by construction; ``torch.library.opcheck`` in
``tests/test_compile.py`` checks each fake against its implementation.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

NAMESPACE = "blocksparse_moe"


def custom_op(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Register the decorated function as ``torch.ops.blocksparse_moe.<name>`` with ``fake``.

    The function must be pure (no argument is mutated, no output aliases an input) and
    type-annotated (the schema is inferred from the annotations). Returns a function with
    the same signature (positional arguments only) that dispatches as described in the
    module docstring; the registered op is its ``.op`` attribute.
    """

    def register(fn: Callable) -> Callable:
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
        op.register_fake(fake)

        @functools.wraps(fn)
        def call(*args):
            if torch.compiler.is_compiling():
                return op(*args)
            return fn(*args)

        call.op = op
        return call

    return register
