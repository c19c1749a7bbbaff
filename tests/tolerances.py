"""The one tolerance table, and the comparison every test uses.

References are computed in float64 from the *already rounded* inputs, so the error left is
the op's own: fp32 accumulation over K terms and the final rounding of the output to its
dtype. Inputs in tests are scaled so outputs are O(1) (unit-variance entries, 1/sqrt(K)
scaling), which makes an absolute term meaningful.

    kind "op":     one product / permute. fp32: accumulation of ~K*eps32 relative, K <= 512.
                   fp16: one output rounding (2^-11 ~ 4.9e-4) dominates. bf16: one output
                   rounding (2^-8 ~ 3.9e-3) dominates.
    kind "layer":  a whole MoE layer or a gradient through it: two or three rounded
                   intermediates (hidden blocks, activation, expert output) feed further sums,
                   so the rounding of each intermediate is amplified by up to ~sqrt(F).
"""

import torch

TOL = {
    ("op", torch.float64): (1e-10, 1e-10),
    ("op", torch.float32): (1e-5, 1e-5),
    ("op", torch.float16): (2e-3, 2e-3),
    ("op", torch.bfloat16): (1.6e-2, 1.6e-2),
    ("layer", torch.float64): (1e-9, 1e-9),
    ("layer", torch.float32): (1e-4, 1e-4),
    ("layer", torch.float16): (1e-2, 1e-2),
    ("layer", torch.bfloat16): (6e-2, 6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str = "op", msg: str = ""):
    """Compare in float64 with the table's (rtol, atol); NaN or inf anywhere fails."""
    rtol, atol = TOL[(kind, dtype)]
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert torch.isfinite(a).all(), f"{msg} result has {int((~torch.isfinite(a)).sum())} non-finite values"
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=False, msg=lambda m: f"{msg} {m}")


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so an element a kernel forgot to write fails."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
