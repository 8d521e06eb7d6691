"""Hostile request material for the fuzzers: a JSON writer that can say what
json.dumps will not (NaN, lone surrogates, invalid UTF-8, repeated keys,
nesting deeper than any parser recurses), the edge values a careless or
malicious client sends, and hypothesis strategies of such values.

Nothing here talks to a server; tests/reliability/fuzzing.py does. The
routes and their hostile field combinations are in fuzz_routes.py."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

# The fuzz stack's models (tests/reliability/fuzzing.py): a tiny llama with
# fill-in-the-middle tokens, and a tiny BERT that embeds and reranks.
CHAT_MODEL = "tiny"
EMBED_MODEL = "embed"
# Tokens in the tiny FIM llama's vocabulary: ids 0..N_VOCAB-1 exist.
N_VOCAB = 723


@dataclass(frozen=True)
class Raw:
    """Bytes written verbatim where a JSON value goes."""

    text: bytes


@dataclass(frozen=True)
class Pairs:
    """A JSON object that may repeat a key (the last one wins in Python)."""

    items: tuple[tuple[str, Any], ...]


def dumps(value: Any) -> bytes:
    """JSON bytes of `value`, where Raw is spliced in as is and floats that
    are not finite are written as the NaN/Infinity literals Python's parser
    accepts (json.dumps writes them too, so clients do send them)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs):
        return b"{" + b",".join(dumps(k) + b":" + dumps(v) for k, v in value.items) + b"}"
    if isinstance(value, dict):
        return b"{" + b",".join(dumps(str(k)) + b":" + dumps(v) for k, v in value.items()) + b"}"
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(dumps(v) for v in value) + b"]"
    if isinstance(value, float) and not math.isfinite(value):
        return b"NaN" if math.isnan(value) else (b"Infinity" if value > 0 else b"-Infinity")
    # ensure_ascii writes a lone surrogate as the escape \ud800, which every
    # JSON parser decodes into a string no UTF-8 encoder accepts.
    return json.dumps(value).encode()


def nested(depth: int, *, objects: bool = False) -> Raw:
    """An array (or object) nested `depth` levels deep, as raw JSON."""
    if objects:
        return Raw(b'{"a":' * depth + b"1" + b"}" * depth)
    return Raw(b"[" * depth + b"]" * depth)


NUMBERS: tuple[Any, ...] = (
    Raw(b"NaN"),
    Raw(b"Infinity"),
    Raw(b"-Infinity"),
    Raw(b"1e400"),
    Raw(b"-1e400"),
    Raw(b"1e-400"),
    -0.0,
    0,
    -1,
    0.5,
    2**31 - 1,
    2**31,
    -(2**31) - 1,
    2**32,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
    1.7976931348623157e308,
    5e-324,
    # Past Python's 4300-digit int conversion limit: json.loads raises ValueError.
    Raw(b"9" * 5000),
)
STRINGS: tuple[Any, ...] = (
    "",
    " ",
    "x" * 200_000,
    "\ud800",
    "a\udfff\ud800b",
    Raw(b'"\xed\xa0\x80"'),  # a surrogate encoded as UTF-8: invalid UTF-8
    Raw(b'"\xff\xfe\xfd"'),
    Raw(b'"\xc3"'),
    "\u0000",
    "a\u0000b",
    "<|im_start|>",
    "<|im_end|>",
    "</s>",
    "<s>",
    "<|fim_prefix|>",
    "\u202e\ufeff\u200b",
    "😀" * 500,
    "\n" * 2000,
    "{{ raise_exception('boom') }}",
    "{% for x in range(99999999) %}x{% endfor %}",
    "\\",
    '"',
)
CONTAINERS: tuple[Any, ...] = (
    [],
    {},
    [[]],
    [None],
    [""],
    nested(10_000),
    nested(10_000, objects=True),
    nested(100),
    list(range(20_000)),
    ["x"] * 5_000,
    {"a": 1},
)
WRONG_TYPES: tuple[Any, ...] = (True, False, None, "1", [1], {"a": 1}, 1, 1.5)
EDGE_VALUES: tuple[Any, ...] = NUMBERS + STRINGS + CONTAINERS + WRONG_TYPES

TOKEN_IDS: tuple[int, ...] = (-1, -(2**31), N_VOCAB, N_VOCAB + 1, 10**6, 2**31, 2**32, 2**63, 2**64)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
edge_values = st.sampled_from(EDGE_VALUES) | json_values
hostile_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=50)

# Values a parser accepts as the same type: these get past validation and
# reach the tokenizer, the template and the engine.
_SAME_NUMBERS = [n for n in NUMBERS if isinstance(n, (int, float))]
_SAME_STRINGS = [v for v in STRINGS if isinstance(v, str)]


def similar(value: Any) -> st.SearchStrategy[Any]:
    """Hostile values of the same JSON type as `value`."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, (int, float)):
        return st.sampled_from(_SAME_NUMBERS) | st.integers() | st.floats(allow_nan=False)
    if isinstance(value, str):
        return st.sampled_from(_SAME_STRINGS) | hostile_text
    if isinstance(value, list) and value:
        return st.lists(similar(value[0]), min_size=1, max_size=6)
    if isinstance(value, dict) and value:
        return st.fixed_dictionaries({k: similar(v) for k, v in value.items()})
    return edge_values


# Bodies that are not a request at all.
junk_body = (
    st.binary(max_size=200)
    | json_values.map(lambda v: dumps(v))
    | st.sampled_from(EDGE_VALUES).map(dumps)
    | st.just(b"")
    | st.just(b"\xef\xbb\xbf{}")
)
