"""What every vocabulary the API reads (a GGUF's through llama.cpp, a Hugging
Face tokenizer.json) does the same way, given its own `tokenize`."""

from __future__ import annotations

from schemas.llama_vocab import tokenize_mixed


class BaseVocab:
    n_tokens: int

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        raise NotImplementedError

    def tokenize_mixed(
        self, parts: list[int | str], *, add_special: bool, parse_special: bool
    ) -> list[int]:
        return tokenize_mixed(
            self.tokenize, parts, add_special=add_special, parse_special=parse_special
        )

    def invalid(self, tokens: list[int]) -> int | None:
        """The first token id that is not in the vocabulary, if any."""
        return next((t for t in tokens if not 0 <= t < self.n_tokens), None)
