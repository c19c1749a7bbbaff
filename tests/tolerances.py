"""The comparisons every test uses, with THE tolerance table (``blocksparse_moe.tolerances``).

``TOL`` and the rounded-once bound are defined once, in the package, with the arithmetic
behind each entry; this module turns them into assertions that reject NaN and inf:

* :func:`assert_close`: ``|out - ref| <= atol + rtol |ref|`` with the table's entry;
* :func:`assert_rounded_once`: fp16/bf16 results of ops that accumulate in fp32 and round
  once, against the float64 reference rounded once to the dtype: at most 1 ulp apart (plus
  the fp32 accumulation bound when the op sums ``terms`` products). A second rounding to
  fp16/bf16 anywhere inside the op fails it.
"""

import torch

from blocksparse_moe.tolerances import TOL, rounded_once_bound

__all__ = ["TOL", "assert_close", "assert_rounded_once", "assert_op", "poisoned", "reference_with_magnitude",
           "HALF_DTYPES"]

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _finite(a: torch.Tensor, msg: str) -> None:
    assert torch.isfinite(a).all(), f"{msg} result has {int((~torch.isfinite(a)).sum())} non-finite values"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str = "op", msg: str = ""):
    """Compare in float64 with the table's (rtol, atol); NaN or inf anywhere fails."""
    rtol, atol = TOL[(kind, dtype)]
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    _finite(a, msg)
    _finite(e, f"{msg} (reference)")
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=False, msg=lambda m: f"{msg} {m}")


def assert_rounded_once(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *, terms: int = 0,
                        magnitude=None, msg: str = ""):
    """``actual`` (fp16/bf16) is ``expected`` (float64) rounded once to ``dtype``, give or take
    1 ulp and the fp32 accumulation bound ``gamma_terms * magnitude`` (``magnitude``: the
    same reference on the inputs' absolute values). No-op for fp32/fp64 (``assert_close``
    covers them). NaN or inf anywhere fails."""
    if dtype not in HALF_DTYPES:
        return
    assert actual.dtype == dtype, f"{msg} dtype {actual.dtype} != {dtype}"
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    _finite(actual.detach().to("cpu", torch.float64), msg)
    error, allowed = rounded_once_bound(actual, expected, dtype, terms=terms, magnitude=magnitude)
    bad = error > allowed
    if bad.any():
        i = int(torch.argmax((error / allowed).reshape(-1)))
        raise AssertionError(
            f"{msg} {int(bad.sum())} of {error.numel()} elements are more than 1 ulp (+ the fp32 accumulation bound) "
            f"from the float64 reference rounded once to {dtype}: worst at flat index {i}, got "
            f"{float(actual.reshape(-1)[i])}, reference {float(expected.reshape(-1)[i])} (rounded "
            f"{float(expected.reshape(-1)[i].to(dtype))}), error {float(error.reshape(-1)[i]):.3g} > allowed "
            f"{float(allowed.reshape(-1)[i]):.3g}")


def assert_op(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *, terms: int, magnitude,
              msg: str = ""):
    """An op's result: within the table's "op" entry, and (fp16/bf16) rounded once."""
    assert_close(actual, expected, dtype, "op", msg=msg)
    assert_rounded_once(actual, expected, dtype, terms=terms, magnitude=magnitude, msg=f"{msg} (rounded once)")


def reference_with_magnitude(fn, inputs, grad_output=None):
    """``fn`` (a reference.py function of tensors) in float64 on CPU copies of ``inputs`` and on
    their absolute values: ``(value, magnitude)``, or with ``grad_output`` also the gradients
    of ``<value, grad_output>`` and of ``<|.|-value, |grad_output|>``: ``(value, magnitude,
    grads, grad_magnitudes)``. The magnitude of a product is ``sum_k |a_k b_k|`` elementwise,
    what :func:`assert_rounded_once` needs to bound the fp32 accumulation."""
    x = [t.detach().to("cpu", torch.float64).requires_grad_(grad_output is not None) for t in inputs]
    ax = [t.detach().abs().requires_grad_(grad_output is not None) for t in x]
    value, magnitude = fn(*x), fn(*ax)
    if grad_output is None:
        return value.detach(), magnitude.detach()
    g = grad_output.detach().to("cpu", torch.float64)
    grads = torch.autograd.grad(value, x, g)
    grad_magnitudes = torch.autograd.grad(magnitude, ax, g.abs())
    return value.detach(), magnitude.detach(), grads, grad_magnitudes


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so an element a kernel forgot to write fails."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
