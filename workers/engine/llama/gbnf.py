"""A light reading of GBNF grammars, for what llama.cpp does not tell.

llama.cpp's parser reports why a grammar failed only on stderr, and recurses
once per nested group (a deep nesting overflows the C stack). This lexer
finds the nesting depth before the parser runs, and afterwards the usual
reasons a grammar failed, for the 400 to name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NAME = re.compile(r"[A-Za-z0-9-]+")
_DEFINITION = re.compile(r"^[ \t]*([A-Za-z0-9-]+)[ \t]*::=", re.MULTILINE)


@dataclass
class Scan:
    """The grammar with literals, classes, token references and comments
    blanked out (same length, newlines kept), and what the scan saw."""

    text: str
    depth: int = 0
    unterminated: str | None = None
    unbalanced: str | None = None
    rules: list[str] = field(default_factory=list)


def scan(grammar: str) -> Scan:
    out = list(grammar)
    depth = deepest = 0
    unterminated = unbalanced = None
    i, n = 0, len(grammar)

    def blank(start: int, end: int) -> None:
        for k in range(start, min(end, n)):
            if out[k] not in "\r\n":
                out[k] = " "

    while i < n:
        c = grammar[i]
        if c in '"[<':
            close = {'"': '"', "[": "]", "<": ">"}[c]
            start = i
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
            if i >= n and unterminated is None:
                line = grammar.count("\n", 0, start) + 1
                unterminated = f"the {c}...{close} opened on line {line} is never closed"
            blank(start, i + 1)
        elif c == "#":
            start = i
            while i < n and grammar[i] not in "\r\n":
                i += 1
            blank(start, i)
            continue
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
            if depth < 0 and unbalanced is None:
                unbalanced = f"a ')' on line {grammar.count(chr(10), 0, i) + 1} closes no group"
                depth = 0
        i += 1
    if depth > 0 and unbalanced is None:
        unbalanced = f"{depth} '(' never closed"
    text = "".join(out)
    return Scan(text, deepest, unterminated, unbalanced, _DEFINITION.findall(text))


def nesting(grammar: str) -> int:
    """The deepest nesting of ( ) groups, outside literals and comments."""
    return scan(grammar).depth


def why_unparsable(grammar: str, root: str = "root") -> str:
    """The likeliest reason llama.cpp rejected `grammar`, in words."""
    seen = scan(grammar)
    if not grammar.strip():
        return "the grammar is empty"
    if seen.unterminated:
        return seen.unterminated
    if seen.unbalanced:
        return seen.unbalanced
    defined = set(seen.rules)
    if not defined:
        return "it defines no rule (rules are written `name ::= ...`)"
    if root not in defined:
        return f"it has no `{root}` rule"
    bodies = re.split(r"^[ \t]*[A-Za-z0-9-]+[ \t]*::=", seen.text, flags=re.MULTILINE)[1:]
    for name, body in zip(seen.rules, bodies, strict=False):
        used = _NAME.findall(re.sub(r"\{[^}]*\}", " ", body))
        missing = [u for u in used if u not in defined and not u.isdigit()]
        if missing:
            return f"rule `{name}` uses `{missing[0]}`, which is not defined"
        first = body.split("|")
        if any(_NAME.match(alt.strip()) and _first_name(alt) == name for alt in first):
            return f"rule `{name}` is left-recursive, which llama.cpp does not support"
    return "llama.cpp's GBNF parser rejected its syntax"


def _first_name(alternative: str) -> str | None:
    match = _NAME.match(alternative.strip())
    return match.group(0) if match else None
