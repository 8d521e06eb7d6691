"""Write a tiny random-weight gemma3-architecture GGUF model with sliding-window
attention, for tests of what sliding-window layers change (the KV cache keeps
only the last ``n_swa`` positions of those layers, so a cached prefix is usable
only while its window is still there).

``write_tiny_gemma3`` is ``tests.support.tinymodel.write_tiny_llama`` in a
gemma3 body: the same vocabulary, special tokens, ChatML template and
"bigram cycle" weights (embeddings, output projection and the attention/FFN
matrices all come from ``tinymodel._weights``), plus what the gemma3 loader
requires besides:

* six layers, llama.cpp's gemma3 pattern of five sliding-window layers to one
  global layer (layer 5), so both kinds of layer and both KV caches are used;
* per layer, the norms gemma3 adds around attention and the FFN
  (``post_attention_norm``, ``post_ffw_norm``, ``attn_q_norm``,
  ``attn_k_norm``), constant vectors (gemma's converter already folds in its
  ``1 + w``, so the file's weights are the scales llama.cpp applies): the
  Q/K norms put back tinymodel's Q/K gain, which the per-head RMS norm would
  wash out; the post norms set how much each layer adds (see _OUT_GAIN);
* ``gemma3.attention.sliding_window`` = ``n_swa``.

Gemma scales the token embeddings by sqrt(n_embd) before the first layer and
RMS-norms every layer's output before it joins the residual stream, so the
post norms decide how far the layers pull the last hidden state away from
the bigram walk of the embeddings. tinymodel's bias channel, which no layer
writes, still keeps every special, byte and prefix token out of reach:
greedy decoding produces whole words and never an end-of-generation token.
The file is about 1.4 MB and a pure function of its arguments.

Like the tiny llama, the model is not numerically robust: evaluating a prompt
in other ubatches (as a cached prefix does) moves log-probabilities by up to
a few 1e-3, and the top two candidates of a greedy step are that close at
about 0.3% of steps, so an exact greedy comparison between two chunkings
now and then meets a flipped near tie.
"""

from __future__ import annotations

import pathlib
from typing import Final

import gguf
import numpy as np
import numpy.typing as npt

from tests.support.gguf_file import Shape, write_gguf
from tests.support.tinymodel import (
    _N_CTX_TRAIN,
    _N_EMBD,
    _N_FF,
    _N_HEAD,
    _N_HEAD_KV,
    _N_LAYER,
    _QK_GAIN,
    _RMS_EPS,
    _ROPE_BASE,
    _vocabulary,
    _weights,
    write_vocab,
)

__all__ = ["N_LAYER", "SWA_PATTERN", "write_tiny_gemma3"]

# llama.cpp's gemma3 default: of every SWA_PATTERN layers the last is global.
SWA_PATTERN: Final = 6
N_LAYER: Final = SWA_PATTERN
_HEAD_DIM: Final = _N_EMBD // _N_HEAD
_SHAPE: Final = Shape(
    n_ctx_train=_N_CTX_TRAIN, n_embd=_N_EMBD, n_layer=N_LAYER, n_ff=_N_FF, n_head=_N_HEAD
)
# Gemma3 normalises Q and K per head (RMS) before attention, which undoes
# tinymodel's Q/K init gain; the norm weights put it back, so attention stays
# peaky and the output depends on specific earlier tokens.
_QK_NORM_GAIN: Final = float(np.sqrt(_QK_GAIN))
# Weight of the post-attention and post-FFN norms, so the RMS of what each
# layer adds to the residual stream: as large as the scaled embedding's
# (sqrt(n_embd)). Measured on random 300-word prompts (n_swa 32): with 1 (or
# up to 4) greedy output is a pure bigram walk that no earlier token changes;
# with sqrt(n_embd), changing the token 5 or 20 positions back changed the
# next 16 greedy tokens in 39 of 40 prompts, 60 back (beyond one window) in
# 16 of 20, 200 back (beyond five stacked windows: only the global layer sees
# it) in 4 of 20, and 16 greedy tokens still hold about 11 distinct words.
_OUT_GAIN: Final = float(np.sqrt(_N_EMBD))


def _gemma_weights(
    n_vocab: int, generated_ids: list[int], rng: np.random.Generator
) -> dict[str, npt.NDArray[np.float32]]:
    """tinymodel's tensors for N_LAYER layers (it makes _N_LAYER at a time:
    each further call's layers are renumbered after the previous ones), with
    gemma3's extra norms."""
    tensors: dict[str, npt.NDArray[np.float32]] = {}
    for first in range(0, N_LAYER, _N_LAYER):
        for name, tensor in _weights(n_vocab, generated_ids, rng).items():
            if not name.startswith("blk."):
                # Embeddings and output: the first call's, like a single model.
                tensors.setdefault(name, tensor)
                continue
            _, index, rest = name.split(".", 2)
            if first + int(index) < N_LAYER:
                tensors[f"blk.{first + int(index)}.{rest}"] = tensor
    for i in range(N_LAYER):
        p = f"blk.{i}."
        tensors[p + "post_attention_norm.weight"] = np.full(_N_EMBD, _OUT_GAIN, dtype=np.float32)
        tensors[p + "post_ffw_norm.weight"] = np.full(_N_EMBD, _OUT_GAIN, dtype=np.float32)
        tensors[p + "attn_q_norm.weight"] = np.full(_HEAD_DIM, _QK_NORM_GAIN, dtype=np.float32)
        tensors[p + "attn_k_norm.weight"] = np.full(_HEAD_DIM, _QK_NORM_GAIN, dtype=np.float32)
    return tensors


def write_tiny_gemma3(path: pathlib.Path, *, seed: int = 0, n_swa: int = 32) -> pathlib.Path:
    """Write the tiny gemma3 GGUF model, whose sliding-window layers attend to
    the last ``n_swa`` positions, to ``path`` and return ``path``. The same
    arguments give a byte-identical file."""
    if n_swa <= 0:
        raise ValueError(f"n_swa must be positive, not {n_swa}")
    tokens, scores, types, generated_ids = _vocabulary()
    rng = np.random.default_rng(seed)
    tensors = _gemma_weights(len(tokens), generated_ids, rng)

    def hparams(writer: gguf.GGUFWriter) -> None:
        writer.add_head_count_kv(_N_HEAD_KV)
        writer.add_key_length(_HEAD_DIM)
        writer.add_value_length(_HEAD_DIM)
        writer.add_rope_freq_base(_ROPE_BASE)
        writer.add_layer_norm_rms_eps(_RMS_EPS)
        writer.add_sliding_window(n_swa)
        writer.add_vocab_size(len(tokens))

    return write_gguf(
        path,
        arch="gemma3",
        name="inferq-tiny-gemma3",
        shape=_SHAPE,
        tokenizer="llama",
        tokens=tokens,
        tensors=tensors,
        hparams=hparams,
        vocab=lambda writer: write_vocab(writer, scores, types),
    )
