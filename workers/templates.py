"""Prompt templates live in schemas/templates.py (the API renders them too,
for /apply-template); re-exported here for the worker's imports."""

from __future__ import annotations

from schemas.templates import CHATML, PromptBuilder, PromptError, tool_instructions

__all__ = ["CHATML", "PromptBuilder", "PromptError", "tool_instructions"]
