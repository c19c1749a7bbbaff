"""The comparison every test uses, with THE tolerance table (``blocksparse_moe.tolerances.TOL``).

``TOL`` is defined once, in the package, with the reason for each entry; it is re-exported
here so tests read ``from tolerances import TOL, assert_close, poisoned``.
"""

import torch

from blocksparse_moe.tolerances import TOL

__all__ = ["TOL", "assert_close", "poisoned"]


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
