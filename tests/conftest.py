"""Fixtures shared by the sandbox test files: the isolation levels that work on this machine."""

from __future__ import annotations

import pytest
from rlvr.verifiers.sandbox import ISOLATION_LEVELS, SandboxError, run_in_sandbox


def _unavailable(level: str) -> str | None:
    """Return None if sandbox isolation ``level`` works here, else the reason it does not."""
    try:
        run_in_sandbox("", ["assert True"], mode="asserts", isolation=level)
    except SandboxError as exc:
        return str(exc).splitlines()[0]
    return None


@pytest.fixture(scope="module", params=ISOLATION_LEVELS)
def level(request):
    """Each sandbox isolation level in turn; skipped with the reason where it does not work."""
    reason = _unavailable(request.param)
    if reason is not None:
        pytest.skip(f"{request.param} unavailable: {reason}")
    return request.param


@pytest.fixture(scope="module")
def namespaces_level():
    """The 'namespaces' level, or a skip where it does not work here."""
    if _unavailable("namespaces") is not None:
        pytest.skip("namespaces level unavailable here")
    return "namespaces"
