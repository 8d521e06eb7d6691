"""llama-server's /completion and /infill on the worker: prompts given as
strings and token ids (evaluated verbatim, no template), the fill-in-the-middle
layout, and the settings llama-server reports (`generation_settings`, /props).
Only llama-server jobs come here: `shapers` is their entry in
WorkerRuntime.shapers, which workers.main wires."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import redis

from schemas.events import Accepted
from schemas.jobs import LLAMA_ENDPOINTS, GenerateJob, InfillInput
from schemas.llama_vocab import tokenize_mixed
from schemas.registry import ModelConfig
from workers.engine.interface import InvalidRequest
from workers.engine.llama.engine import LlamaEngine
from workers.engine.llama.model import LlamaModel
from workers.engine.llama.options import resolve_sampling
from workers.engine.types import Sampling
from workers.prompts import PromptShaper
from workers.props import generation_settings, model_props, publish

log = logging.getLogger(__name__)

# llama-server's separator between /infill extra chunks when the model has no
# FIM file-separator token.
_CHUNK_SEPARATOR = "\n\n--- snippet ---\n\n"


class LlamaPromptError(InvalidRequest):
    """A /completion or /infill request the worker cannot run (a 400)."""

    def __init__(
        self, message: str, *, param: str | None = "prompt", code: str = "invalid_request_error"
    ) -> None:
        super().__init__(message, param=param, code=code)


def mixed_tokens(
    model: LlamaModel, parts: Sequence[int | str], *, add_special: bool, parse_special: bool
) -> list[int]:
    return tokenize_mixed(
        model.tokenize, parts, add_special=add_special, parse_special=parse_special
    )


def completion_tokens(model: LlamaModel, parts: Sequence[int | str]) -> list[int]:
    first = parts[0] if parts else ""
    # A prompt that writes its BOS itself does not get a second one.
    bos = model.bos_text
    add_special = not (isinstance(first, str) and bos and first.startswith(bos))
    return mixed_tokens(model, parts or [""], add_special=add_special, parse_special=True)


def _fim_tokens(model: LlamaModel) -> dict[str, int]:
    vocab = model.vocab
    return {
        "prefix": int(llama_cpp.llama_vocab_fim_pre(vocab)),
        "suffix": int(llama_cpp.llama_vocab_fim_suf(vocab)),
        "middle": int(llama_cpp.llama_vocab_fim_mid(vocab)),
        "repo": int(llama_cpp.llama_vocab_fim_rep(vocab)),
        "separator": int(llama_cpp.llama_vocab_fim_sep(vocab)),
    }


def supports_infill(model: LlamaModel) -> bool:
    fim = _fim_tokens(model)
    return min(fim["prefix"], fim["suffix"], fim["middle"]) >= 0


def infill_tokens(
    model: LlamaModel, infill: InfillInput, *, n_batch: int, n_ctx: int, n_predict: int
) -> list[int]:
    """llama-server's format_infill: [extra chunks] [BOS] FIM_PRE prefix
    prompt FIM_SUF suffix FIM_MID. Like llama-server, the prefix keeps its
    last 3/4 of a batch, the suffix its first 1/4, and extra chunks fill what
    the context has left (the prompt goes after the prefix, as llama-server's
    code does, although its README says after FIM_MID)."""
    fim = _fim_tokens(model)
    missing = [name for name in ("prefix", "suffix", "middle") if fim[name] < 0]
    if missing:
        raise LlamaPromptError(
            "infill is not supported by this model: its vocabulary has no "
            f"fill-in-the-middle {', '.join(missing)} token",
            param="model",
            code="infill_not_supported",
        )

    def text(value: str) -> list[int]:
        return model.tokenize(value, add_special=False, parse_special=False)

    extra: list[int] = []
    if fim["repo"] >= 0:
        extra += [fim["repo"], *text("myproject\n")]
    for chunk in infill.input_extra:
        if fim["separator"] >= 0:
            extra += [fim["separator"], *text(chunk.filename + "\n")]
        else:
            extra += text(_CHUNK_SEPARATOR)
        extra += text(chunk.text)
    if fim["separator"] >= 0:
        extra += [fim["separator"], *text("filename\n")]
    prefix = mixed_tokens(model, infill.input_prefix, add_special=False, parse_special=False)
    suffix = mixed_tokens(model, infill.input_suffix, add_special=False, parse_special=False)
    prompt = model.tokenize(infill.prompt, add_special=False, parse_special=True)
    n_prefix = min(len(prefix), 3 * (n_batch // 4))
    n_suffix = min(len(suffix), max(0, n_batch // 4 - (2 + len(prompt))))
    n_extra = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra))
    head = [fim["prefix"], *prefix[len(prefix) - n_prefix :], *prompt]
    if model.add_bos:
        head.insert(0, int(llama_cpp.llama_vocab_bos(model.vocab)))
    return [*extra[len(extra) - n_extra :], *head, fim["suffix"], *suffix[:n_suffix], fim["middle"]]


def llama_tokens(engine: LlamaEngine, job: GenerateJob) -> list[int]:
    """The prompt tokens of a /completion or /infill job, checked."""
    model = engine.model
    if job.id_slot is not None and not 0 <= job.id_slot < engine.n_slots:
        raise LlamaPromptError(
            f"id_slot {job.id_slot} does not exist: this worker has slots 0 to "
            f"{engine.n_slots - 1}",
            param="id_slot",
        )
    if job.infill is not None:
        limit = job.sampling.max_tokens
        tokens = infill_tokens(
            model,
            job.infill,
            n_batch=model.n_batch,
            n_ctx=engine.n_ctx_per_slot,
            n_predict=-1 if limit is None else limit,
        )
    else:
        tokens = completion_tokens(model, job.prompt_parts or [job.prompt or ""])
    if not tokens:
        raise LlamaPromptError("the prompt is empty")
    for token in tokens:
        if not 0 <= token < model.n_vocab:
            raise LlamaPromptError(
                f"token id {token} is not in the vocabulary (0 to {model.n_vocab - 1})"
            )
    return tokens


def detokenize(model: LlamaModel, tokens: list[int]) -> str:
    """The text of `tokens`, special tokens written out (llama-server's
    `prompt` field); bytes are joined first so UTF-8 split across tokens holds."""
    buf = ctypes.create_string_buffer(256)
    out = bytearray()
    for token in tokens:
        n = llama_cpp.llama_token_to_piece(model.vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(model.vocab, token, buf, len(buf), 0, True)
        out += buf.raw[: max(n, 0)]
    return out.decode("utf-8", errors="replace")


def accepted(
    engine: LlamaEngine, job: GenerateJob, sampling: Sampling, tokens: list[int]
) -> Accepted:
    """The Accepted event of a llama.cpp job: with the settings and the prompt
    as evaluated (special tokens written out), which the answer echoes."""
    prompt = detokenize(engine.model, tokens)
    settings = generation_settings(sampling, n_ctx=engine.n_ctx_per_slot, model=job.model)
    return Accepted(prompt_tokens=len(tokens), settings=settings, prompt=prompt)


class LlamaServerShaper:
    """The PromptShaper of /completion and /infill: the prompt evaluated as
    given, and an Accepted event with the settings and the prompt as evaluated."""

    def __init__(self, engine: LlamaEngine) -> None:
        self.engine = engine

    def tokens(self, job: GenerateJob) -> list[int]:
        return llama_tokens(self.engine, job)

    def accepted(self, job: GenerateJob, sampling: Sampling, tokens: list[int]) -> Accepted:
        return accepted(self.engine, job, sampling, tokens)


def shapers(engine: LlamaEngine) -> dict[str, PromptShaper]:
    """The shaper of every llama-server endpoint (WorkerRuntime.shapers)."""
    shaper = LlamaServerShaper(engine)
    return dict.fromkeys(LLAMA_ENDPOINTS, shaper)


def publish_props(
    client: redis.Redis, config: ModelConfig, engine: LlamaEngine, path: Path
) -> None:
    """What llama-server's GET /props reports about a llama.cpp model."""
    model = engine.model

    def props() -> dict[str, Any]:
        job = GenerateJob(request_id="props", model=config.name, endpoint="llama.completion")
        return model_props(
            config,
            path=path,
            n_ctx=engine.n_ctx_per_slot,
            sampling=resolve_sampling(job, config, model),
            tokenizer=model,
            tokenizer_template=model.metadata("tokenizer.chat_template"),
            build_info=f"inferq (llama-cpp-python {llama_cpp.__version__})",
            infill=supports_infill(model),
        )

    publish(client, config, props)
