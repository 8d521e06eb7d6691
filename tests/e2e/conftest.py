"""End-to-end tests share the session-wide stack (tests/stack.py, registered
by the root conftest)."""

from __future__ import annotations

from tests.stack import MODEL, Stack

__all__ = ["MODEL", "Stack"]
