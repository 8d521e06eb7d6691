"""A Hugging Face tokenizer (vLLM's own instance) as the worker's Tokenizer
(workers.engine.interface): what prompt building, logit_bias and /props ask
of a vocabulary."""

from __future__ import annotations

from typing import Any


class HfTokenizer:
    """`n_vocab` is the model's vocabulary size (its embedding rows), which
    can exceed the tokenizer's: ids up to it are valid for the model."""

    def __init__(self, tokenizer: Any, n_vocab: int) -> None:
        self._tokenizer = tokenizer
        self._n_vocab = n_vocab
        self._bos_text: str = tokenizer.bos_token or ""
        self._eos_text: str = tokenizer.eos_token or ""
        bos_id = tokenizer.bos_token_id
        probe = tokenizer.encode("a", add_special_tokens=True)
        self._add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
        # The separator after which a pair's second text has token type 1,
        # when the tokenizer writes token types at all.
        self._pair_separator: int | None = None
        try:
            types = tokenizer("a", "b").get("token_type_ids")
        except Exception:
            types = None
        if types is not None and any(types) and tokenizer.sep_token_id is not None:
            self._pair_separator = int(tokenizer.sep_token_id)

    @classmethod
    def of(cls, llm: Any) -> HfTokenizer:
        """The tokenizer of a running AsyncLLM, with its model's vocabulary size."""
        return cls(llm.get_tokenizer(), llm.model_config.get_vocab_size())

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    @property
    def bos_text(self) -> str:
        return self._bos_text

    @property
    def eos_text(self) -> str:
        return self._eos_text

    @property
    def chat_template(self) -> str | None:
        template = getattr(self._tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        # split_special_tokens: text that spells a special token ("</s>") is
        # plain text unless special tokens are parsed (llama.cpp's meaning).
        ids = self._tokenizer.encode(
            text, add_special_tokens=add_special, split_special_tokens=not parse_special
        )
        return [int(t) for t in ids]

    def pair(self, first: str, second: str) -> list[int]:
        """A cross-encoder's (query, document) input as the model was trained
        on it (the tokenizer's pair template: [CLS] q [SEP] d [SEP], say)."""
        encoded = self._tokenizer(first, second, truncation=False)
        return [int(t) for t in encoded["input_ids"]]

    def second_text_at(self, ids: list[int]) -> int | None:
        """Where a pair from `pair` starts its second text, for models that
        tell it by token types (BERT: type 1 after the first separator); None
        for models that do not use them."""
        if self._pair_separator is None:
            return None
        try:
            return ids.index(self._pair_separator) + 1
        except ValueError:
            return len(ids)
