"""The bounds every request value is checked against before it reaches a
worker, Postgres or llama.cpp: numeric types sized to the C types they end
up in, and a walk over a whole body for what no field type can see (NaN in a
JSON schema, unpaired surrogates, NUL characters, deep nesting).

Each bound lives here once; the request models of every route reuse these
aliases, so a value refused on one route is refused on all of them."""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any

from pydantic import BaseModel, Field, model_validator

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
# The largest finite float32: llama.cpp keeps sampling parameters as floats,
# and a larger double becomes infinity there.
FLOAT32_MAX = 3.4028234663852886e38
# Deeper JSON is refused: nothing inferq accepts needs it, and recursive
# code (pydantic, json.dumps, grammar builders) must never hit Python's limit.
MAX_DEPTH = 64

Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
NonNegInt32 = Annotated[int, Field(ge=0, le=INT32_MAX)]
PositiveInt32 = Annotated[int, Field(ge=1, le=INT32_MAX)]
# -1 means "the whole context" (llama.cpp's repeat_last_n) or "no limit".
MinusOneInt32 = Annotated[int, Field(ge=-1, le=INT32_MAX)]
# llama.cpp seeds are uint32; -1 (and 0xFFFFFFFF) mean a random seed.
Seed = Annotated[int, Field(ge=-1, le=UINT32_MAX)]
# A token id as a C int32; whether it is in the vocabulary is the worker's check.
TokenId = Int32
Float32 = Annotated[float, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX, allow_inf_nan=False)]
NonNegFloat32 = Annotated[float, Field(ge=0.0, le=FLOAT32_MAX, allow_inf_nan=False)]
PositiveFloat32 = Annotated[float, Field(gt=0.0, le=FLOAT32_MAX, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
# OpenAI's range for presence and frequency penalties.
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
# Beam scores divide by length ** length_penalty: past +-10 that overflows a
# double for long hypotheses (2048 ** 100 is 1e331).
LengthPenalty = Annotated[float, Field(ge=-10.0, le=10.0, allow_inf_nan=False)]
# Alternatives per token (OpenAI's top_logprobs limit).
LogprobCount = Annotated[int, Field(ge=0, le=20)]
# Sequences of one request (the model's slots bound it further).
Width = Annotated[int, Field(ge=1, le=64)]
# A logit bias: a number, or false to ban the token.
Bias = Float32 | bool


_TOKEN_KEY = re.compile(r"-?[0-9]{1,20}")


def token_key(key: str) -> int | None:
    """A logit_bias key as a token id: ASCII digits only (int() would also
    take "²" or "٣" and fail later, or other digits), within int32; None
    when the key is not an integer at all."""
    if not _TOKEN_KEY.fullmatch(key):
        return None
    value = int(key)
    if not INT32_MIN <= value <= INT32_MAX:
        raise ValueError(f"token id {key} is out of range")
    return value


def text_problem(value: str) -> str | None:
    """Why `value` cannot reach the database, a tokenizer or llama.cpp as
    text, or None: a NUL character (Postgres text refuses it) or an unpaired
    surrogate (not valid Unicode, so not encodable as UTF-8)."""
    if "\x00" in value:
        return "holds a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "holds an unpaired surrogate (such as \\ud800), which is not valid Unicode"
    return None


def _where(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path) or "body"


def check_value(value: Any) -> None:
    """ValueError (naming where) for a value no field type can refuse: a
    non-finite number, a string with NUL or an unpaired surrogate (Postgres
    and UTF-8 encoders reject them), or nesting deeper than MAX_DEPTH.
    Iterative, so hostile nesting cannot exhaust the stack."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) >= MAX_DEPTH:
            raise ValueError(f"{_where(path[:3])}...: nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, str):
            problem = text_problem(item)
            if problem:
                raise ValueError(f"{_where(path)}: {problem}")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError(f"{_where(path)}: NaN and Infinity are not accepted")
        elif isinstance(item, dict):
            for key, sub in item.items():
                if isinstance(key, str):
                    problem = text_problem(key)
                    if problem:
                        raise ValueError(f"{_where(path)}: a key {problem}")
                if not isinstance(sub, int):
                    stack.append((sub, (*path, str(key))))
        elif isinstance(item, (list, tuple)):
            # Token arrays are long lists of ints: skip those cheaply.
            stack.extend(
                (sub, (*path, i)) for i, sub in enumerate(item) if not isinstance(sub, int)
            )


class CheckedBody(BaseModel):
    """Base of every top-level request body: the whole raw body is checked
    with check_value before the fields are (nested models do not repeat it)."""

    @model_validator(mode="before")
    @classmethod
    def _check_whole_body(cls, data: Any) -> Any:
        check_value(data)
        return data


def _no_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise json.JSONDecodeError(f"the number {text[:32]} is out of range", text, 0)
    return value


def loads_strict(data: str | bytes) -> Any:
    """json.loads that refuses NaN, Infinity and numbers that overflow a
    double (Python's parser accepts them; Postgres and other parsers do not)."""
    return json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)
