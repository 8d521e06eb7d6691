"""Model vocabularies in the API process, for llama-server's /tokenize and
/detokenize: only the vocabulary is loaded (`vocab_only`, no weights and no
context), lazily, once per model file, from the API's own models directory. A
`backend: vllm` model's is its directory's tokenizer.json (api.hf_vocab)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import llama_cpp

from api.hf_vocab import HfVocab, TokenizerLoadError
from api.vocab_base import BaseVocab
from schemas.llama_vocab import (
    ModelLoadError,
    load_model,
    token_piece,
    tokenize,
)
from schemas.registry import ModelConfig

log = logging.getLogger("inferq.llama")


class VocabUnavailable(Exception):
    """This API process cannot read the model's vocabulary (a 503)."""


class Vocab(BaseVocab):
    """One model's vocabulary. llama.cpp's tokenizer only reads it, so
    requests on several threads may share it."""

    def __init__(self, path: Path) -> None:
        try:
            model = load_model(path, vocab_only=True)
        except ModelLoadError as exc:
            raise VocabUnavailable(f"llama.cpp could not read the vocabulary of {path}") from exc
        # Kept for the life of the process, like the cache holding it.
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_tokens = int(llama_cpp.llama_vocab_n_tokens(self._vocab))

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return tokenize(self._vocab, text, add_special=add_special, parse_special=parse_special)

    def piece(self, token: int) -> bytes:
        """The bytes of one token, special tokens written out (as llama-server's
        common_token_to_piece does). The caller checks the id first."""
        return token_piece(self._vocab, token, special=True)

    def detokenize(self, tokens: list[int]) -> str:
        """The pieces joined, as llama-server's /detokenize answers."""
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")


AnyVocab = Vocab | HfVocab


def _load_hf(path: Path) -> HfVocab:
    try:
        return HfVocab(path)
    except TokenizerLoadError as exc:
        raise VocabUnavailable(str(exc)) from exc


class VocabCache:
    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._lock = threading.Lock()
        self._loaded: dict[Path, AnyVocab] = {}

    def get(self, name: str, config: ModelConfig | None) -> AnyVocab:
        """The vocabulary of model `name` (blocking: call from a thread)."""
        if config is None:
            raise VocabUnavailable(
                f"the API has no local copy of model '{name}': tokenization reads the "
                f"model file from its models directory ({self.models_dir})"
            )
        path = config.model_path(self.models_dir)
        load: Callable[[Path], AnyVocab] = Vocab
        reads = "the model file"
        if config.backend == "vllm":
            # A Hugging Face model directory: only its tokenizer is read.
            path, load = path / "tokenizer.json", _load_hf
            reads = "the tokenizer.json of the model's directory"
        with self._lock:
            vocab = self._loaded.get(path)
            if vocab is None:
                if not path.is_file():
                    raise VocabUnavailable(
                        f"the API has no local copy of model '{name}' ({path} is missing): "
                        f"tokenization reads {reads}"
                    )
                log.info("loading the vocabulary of %s from %s", name, path)
                vocab = self._loaded[path] = load(path)
            return vocab
