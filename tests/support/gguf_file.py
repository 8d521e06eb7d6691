"""Write a small all-F32 GGUF model file: the part every tiny model of the
suite (``tests.support.tinymodel``, ``tests.support.tinybert``) writes alike.

Each model gives its architecture, shape, vocabulary and tensors; what only
one architecture has (rope settings, pooling, special-token flags) it adds
through the ``hparams`` and ``vocab`` callbacks, which run where llama.cpp's
own converter writes those keys, so the key order is the converter's."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import gguf
import numpy as np
import numpy.typing as npt

__all__ = ["Shape", "write_gguf"]

Tensors = Mapping[str, npt.NDArray[np.float32]]


@dataclass(frozen=True)
class Shape:
    """The hyperparameters every transformer GGUF declares."""

    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int


def _no_keys(writer: gguf.GGUFWriter) -> None:
    """Nothing beyond the common keys."""


def write_gguf(
    path: pathlib.Path,
    *,
    arch: str,
    name: str,
    shape: Shape,
    tokenizer: str,
    tokens: list[str],
    tensors: Tensors,
    hparams: Callable[[gguf.GGUFWriter], None] = _no_keys,
    vocab: Callable[[gguf.GGUFWriter], None] = _no_keys,
) -> pathlib.Path:
    """Write the model to ``path`` and return ``path``.

    ``hparams`` adds the architecture's own hyperparameters (after the
    common ones, before the file type); ``vocab`` adds the rest of the
    tokenizer (scores, token types, special ids) after the token list.
    """
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    hparams(writer)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model(tokenizer)
    writer.add_token_list(tokens)
    vocab(writer)

    for tensor_name, tensor in tensors.items():
        writer.add_tensor(tensor_name, tensor)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
