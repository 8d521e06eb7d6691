"""The vocabulary of a `backend: vllm` model for /tokenize and /detokenize:
its Hugging Face `tokenizer.json`, read with the `tokenizers` library (the
API runs no vLLM). Its methods are those of api.vocab.Vocab."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from api.vocab_base import BaseVocab

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes every byte as a printable character:
    that character -> the byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_LEVEL = _byte_level_alphabet()


def _decoders(spec: Any) -> list[dict[str, Any]]:
    """The decoder steps of a tokenizer.json (a Sequence flattened)."""
    if not isinstance(spec, dict):
        return []
    if spec.get("type") == "Sequence":
        return [step for inner in spec.get("decoders") or [] for step in _decoders(inner)]
    return [spec]


class TokenizerLoadError(RuntimeError):
    """tokenizer.json could not be read or parsed."""


class HfVocab(BaseVocab):
    """One model's tokenizer.json. Two tokenizers: one parses special tokens
    written in the text, the other (`encode_special_tokens`) keeps them as
    plain text; neither changes after loading, so threads may share them."""

    def __init__(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
            self._parsing = Tokenizer.from_str(text)
            self._literal = Tokenizer.from_str(text)
            steps = _decoders(json.loads(text).get("decoder"))
        except Exception as exc:  # the tokenizers library raises plain Exception
            raise TokenizerLoadError(f"could not read the tokenizer of {path}: {exc}") from exc
        self._literal.encode_special_tokens = True
        kinds = {step.get("type") for step in steps}
        self._byte_level = "ByteLevel" in kinds
        self._byte_fallback = "ByteFallback" in kinds
        # SentencePiece's word marker, which its decoder turns into a space.
        self._metaspace = "Metaspace" in kinds or any(
            step.get("type") == "Replace" and step.get("pattern") == {"String": "▁"}
            for step in steps
        )
        self._added = {
            int(i): t.content for i, t in self._parsing.get_added_tokens_decoder().items()
        }
        vocab = self._parsing.get_vocab(with_added_tokens=True)
        self.n_tokens = max(vocab.values(), default=-1) + 1

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        tokenizer = self._parsing if parse_special else self._literal
        return list(tokenizer.encode(text, add_special_tokens=add_special).ids)

    def piece(self, token: int) -> bytes:
        """The bytes of one token, special and added tokens written out (as
        llama-server's pieces: a byte token is that byte, not U+FFFD)."""
        if token in self._added:
            return self._added[token].encode()
        name = self._parsing.id_to_token(token)
        if name is None:
            return b""
        if self._byte_level and all(c in _BYTE_LEVEL for c in name):
            return bytes(_BYTE_LEVEL[c] for c in name)
        if self._byte_fallback and (byte := _BYTE_TOKEN.fullmatch(name)):
            return bytes([int(byte.group(1), 16)])
        if self._metaspace:
            return name.replace("▁", " ").encode()
        return self._parsing.decode([token], skip_special_tokens=False).encode()

    def detokenize(self, tokens: list[int]) -> str:
        """The text the tokenizer's own decoder makes of `tokens`, special
        tokens written out (what the model's worker would answer)."""
        return self._parsing.decode(tokens, skip_special_tokens=False)
