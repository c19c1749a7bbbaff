"""Whether Triton's CPU interpreter is asked for: a leaf module, so that ``backend`` (which picks
the back end) and ``kernels`` (which pass the interpreter flag to their kernels) both read the
one rule without importing each other."""

from __future__ import annotations

import os

__all__ = ["interpreter_enabled"]


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read on every call,
    not at import, so tests can flip it; Triton itself reads it when a kernel is decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")
