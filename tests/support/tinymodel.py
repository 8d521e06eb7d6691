"""Write a tiny random-weight llama-architecture GGUF model for tests.

The test suite must not depend on downloading real model weights, yet the
worker code paths (llama.cpp loading, tokenization, chat templating, decoding,
sampling, stop conditions) should run for real.  ``write_tiny_llama`` writes a
deterministic GGUF file (< 1 MB, written in milliseconds) that llama.cpp loads
as an ordinary ``llama`` model with:

* a SentencePiece-style (``tokenizer.ggml.model = "llama"``) vocabulary of
  special tokens, the 256 byte-fallback tokens and a few hundred English word
  pieces, so plain English tokenizes into word pieces and anything else falls
  back to bytes;
* a ChatML chat template (``CHAT_TEMPLATE``) with ``<|im_end|>`` as EOT;
* weights shaped so that greedy decoding produces varied, readable ASCII words
  and (practically) never an end-of-generation, control or byte token.  That
  makes "generate N tokens" tests deterministic: generation always runs to
  ``max_tokens`` instead of stopping at a random EOS.

The weights are random (``numpy.random.default_rng(seed)``) but structured:
the output projection is a scaled, permuted copy of the token embeddings, so
the network behaves roughly like a bigram model walking one long cycle through
the whole-word tokens, nudged by the random attention/FFN layers.

The tiny BERT models for embeddings and rerank (``write_tiny_bert``,
``write_tiny_reranker``) live in ``tests.support.tinybert`` and are re-exported here,
so every tiny model comes from one module.
"""

from __future__ import annotations

import pathlib
from typing import Final

import gguf
import numpy as np
import numpy.typing as npt

from tests.support.gguf_file import Shape, write_gguf
from tests.support.tinybert import write_tiny_bert, write_tiny_reranker

__all__ = [
    "BOS_TOKEN",
    "BOS_TOKEN_ID",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "EOS_TOKEN_ID",
    "FIM_TOKENS",
    "IM_END_TOKEN",
    "IM_END_TOKEN_ID",
    "IM_START_TOKEN",
    "IM_START_TOKEN_ID",
    "UNK_TOKEN",
    "UNK_TOKEN_ID",
    "write_tiny_bert",
    "write_tiny_llama",
    "write_tiny_reranker",
]

# --- special tokens --------------------------------------------------------

UNK_TOKEN: Final = "<unk>"
BOS_TOKEN: Final = "<s>"
EOS_TOKEN: Final = "</s>"
IM_START_TOKEN: Final = "<|im_start|>"
IM_END_TOKEN: Final = "<|im_end|>"

# Ids 0/1/2 are llama.cpp's SPM defaults for unk/bos/eos; we still write them
# explicitly so the file does not rely on defaults.
UNK_TOKEN_ID: Final = 0
BOS_TOKEN_ID: Final = 1
EOS_TOKEN_ID: Final = 2
IM_START_TOKEN_ID: Final = 3
IM_END_TOKEN_ID: Final = 4

# Fill-in-the-middle tokens (Qwen2.5-Coder's spelling), written only with
# `fim=True`, after every other token so no other id moves. In the order of
# llama.cpp's FIM keys: prefix, suffix, middle, pad, repo, file separator.
FIM_TOKENS: Final = (
    "<|fim_prefix|>",
    "<|fim_suffix|>",
    "<|fim_middle|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
_FIM_KEYS: Final = (
    gguf.Keys.Tokenizer.FIM_PRE_ID,
    gguf.Keys.Tokenizer.FIM_SUF_ID,
    gguf.Keys.Tokenizer.FIM_MID_ID,
    gguf.Keys.Tokenizer.FIM_PAD_ID,
    gguf.Keys.Tokenizer.FIM_REP_ID,
    gguf.Keys.Tokenizer.FIM_SEP_ID,
)

# Standard HF-style ChatML template.  llama.cpp recognises it as "chatml"
# (it contains <|im_start|>), and Jinja renderers can run it as-is.
CHAT_TEMPLATE: Final = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# --- architecture ----------------------------------------------------------

_N_EMBD: Final = 64
_N_LAYER: Final = 2
_N_HEAD: Final = 4
_N_HEAD_KV: Final = 4
_N_FF: Final = 128
_N_CTX_TRAIN: Final = 4096
_SHAPE: Final = Shape(
    n_ctx_train=_N_CTX_TRAIN, n_embd=_N_EMBD, n_layer=_N_LAYER, n_ff=_N_FF, n_head=_N_HEAD
)
_RMS_EPS: Final = 1e-5
_ROPE_BASE: Final = 10000.0
# Init gains (std * sqrt(fan_in)) of the random layers, tuned by measuring
# greedy output over many seeds/prompts: larger Q/K gains make attention
# peaky, so each head copies a specific earlier token and the output depends
# on the whole prompt; V/O gains above ~1.3 let attention drown the bigram
# signal and greedy output degenerates into repeating one word.
_QK_GAIN: Final = 2.5
_VO_GAIN: Final = 1.2
_FFN_GAIN: Final = 1.0
# Weight on the bias channel for suppressed tokens (see _weights).
_BAN: Final = 10.0

# SentencePiece marks a word boundary (a preceding space) with U+2581.
_SPACE: Final = "\u2581"

# Whole words the model can generate.  Lower-case words follow a space; a few
# capitalised sentence starters are included so "Hello world" etc. tokenize
# into one piece per word.
_WORDS: Final = tuple(
    " ".join(
        (
            "the of and to in is it you that he was for on are with as his they be at",
            "one have this from or had by word but what some we can out other were all",
            "there when up use your how said an each she which do their time if will",
            "way about many then them write would like so these her long make thing see",
            "him two has look more day could go come did number sound no most people my",
            "over know water than call first who may down side been now find any new",
            "work part take get place made live where after back little only round man",
            "year came show every good me give our under name very through just form",
            "great think say help low line before turn cause same mean old right big",
            "hello world house small sun tree blue green red cat dog bird sky rain",
        )
    ).split()
)
_CAPITALISED: Final = ("Hello", "The", "I", "It", "This", "We", "You", "What", "How", "There", "A")
# Pieces without a space prefix.  "," and "." are also generated, so output
# reads like (nonsense) sentences rather than one endless run of words.
_PUNCT_GENERATED: Final = (",", ".")
_PUNCT_OTHER: Final = ("!", "?", "'", ":", ";", "-", "(", ")", '"')


def _vocabulary() -> tuple[list[str], list[float], list[int], list[int]]:
    """Return (tokens, scores, token types, ids of generatable tokens)."""
    tokens: list[str] = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN]
    types: list[int] = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
    ]
    scores: list[float] = [0.0] * len(tokens)

    # Byte fallback: llama.cpp looks these up by the exact "<0xXX>" spelling
    # whenever a symbol is not in the vocabulary (and for "\n").
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(gguf.TokenType.BYTE)
        scores.append(0.0)

    whole_words = [_SPACE + w for w in _WORDS] + [_SPACE + w for w in _CAPITALISED]
    # SPM merges adjacent symbols only when the merged text is itself a token,
    # so every "▁word" needs its prefixes ("▁w", "▁wo", ...) in the vocabulary
    # or it would never be reached.  Single characters are the merge leaves.
    pieces: dict[str, float] = {}
    for rank, word in enumerate(whole_words):
        # Whole words score higher than their prefixes; earlier (more common)
        # words score higher than later ones.  With prefix-only merges the
        # scores barely matter, but they keep the vocabulary SPM-plausible.
        pieces[word] = -float(rank) / 100.0
        for end in range(2, len(word)):
            prefix = word[:end]
            pieces.setdefault(prefix, -10.0 - len(prefix))
    leaves = (
        [_SPACE]
        + [chr(c) for c in range(ord("a"), ord("z") + 1)]
        + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
        + [str(d) for d in range(10)]
        + list(_PUNCT_GENERATED)
        + list(_PUNCT_OTHER)
    )
    for leaf in leaves:
        # Leaves must exist, but with the lowest scores.  setdefault keeps the
        # whole-word score of one-letter words such as "I"/"A" (as "▁I").
        pieces.setdefault(leaf, -20.0)

    generated = set(whole_words) | set(_PUNCT_GENERATED)
    generated_ids: list[int] = []
    for piece, score in pieces.items():
        if piece in generated:
            generated_ids.append(len(tokens))
        tokens.append(piece)
        types.append(gguf.TokenType.NORMAL)
        scores.append(score)
    return tokens, scores, types, generated_ids


def _weights(
    n_vocab: int, generated_ids: list[int], rng: np.random.Generator
) -> dict[str, npt.NDArray[np.float32]]:
    """Build all tensors, in numpy (row-major) shapes.

    GGUF stores dimensions reversed relative to numpy, so a numpy array of
    shape (n_out, n_in) is the ggml tensor {n_in, n_out} llama.cpp expects.
    """
    d = _N_EMBD
    head_dim = d // _N_HEAD

    # Channel 0 of every embedding is a constant.  After the final RMS norm it
    # is still ~constant and positive, so output rows can use it as a bias:
    # a large negative weight there suppresses a token for every context.
    bias_value = 4.0
    embd = rng.standard_normal((n_vocab, d))
    embd[:, 0] = bias_value

    # Output projection: a single random cycle through the generatable tokens.
    # Row succ(t) is a scaled copy of embedding t (without the bias channel),
    # so when the last hidden state is ~embedding(t) the largest logit is the
    # successor of t.  One cycle (not a random permutation, which may have
    # short cycles) guarantees greedy output visits many distinct tokens.
    # The scale sets how peaked the distribution is: for a bare embedding the
    # successor would get a logit of ~7 and the rest ~N(0, 0.9); the layers
    # blur this (measured top probability ~0.04-0.9, median ~0.13), so
    # temperature-1 sampling wanders while greedy still follows the cycle
    # with context-dependent detours.
    out_scale = 7.0 / (d - 1) * np.sqrt((bias_value**2 + d - 1) / d)
    order = rng.permutation(np.asarray(generated_ids))
    output = np.zeros((n_vocab, d))
    output[np.roll(order, -1), 1:] = out_scale * embd[order, 1:]
    # Every other token (special/control, EOS, <|im_end|>, bytes, prefixes,
    # single letters) gets a logit of about -_BAN * 4 / rms(hidden), measured
    # <= -14 while the best word is > 0: never chosen greedily and with
    # negligible probability when sampling, so outputs are whole ASCII words
    # and generation always runs to max_tokens.
    banned = np.ones(n_vocab, dtype=bool)
    banned[order] = False
    output[banned, 0] = -_BAN

    tensors: dict[str, npt.NDArray[np.float64]] = {
        "token_embd.weight": embd,
        "output_norm.weight": np.ones(d),
        "output.weight": output,
    }
    # Attention/FFN weights are plain random matrices; see the _*_GAIN
    # constants for why they have the sizes they have.
    qk_std = _QK_GAIN / np.sqrt(d)
    vo_std = _VO_GAIN / np.sqrt(d)
    ffn_std = _FFN_GAIN / np.sqrt(d)
    ffn_down_std = _FFN_GAIN / np.sqrt(_N_FF)
    for i in range(_N_LAYER):
        p = f"blk.{i}."
        tensors[p + "attn_norm.weight"] = np.ones(d)
        tensors[p + "attn_q.weight"] = rng.standard_normal((_N_HEAD * head_dim, d)) * qk_std
        tensors[p + "attn_k.weight"] = rng.standard_normal((_N_HEAD_KV * head_dim, d)) * qk_std
        tensors[p + "attn_v.weight"] = rng.standard_normal((_N_HEAD_KV * head_dim, d)) * vo_std
        tensors[p + "attn_output.weight"] = rng.standard_normal((d, _N_HEAD * head_dim)) * vo_std
        tensors[p + "ffn_norm.weight"] = np.ones(d)
        tensors[p + "ffn_gate.weight"] = rng.standard_normal((_N_FF, d)) * ffn_std
        tensors[p + "ffn_up.weight"] = rng.standard_normal((_N_FF, d)) * ffn_std
        tensors[p + "ffn_down.weight"] = rng.standard_normal((d, _N_FF)) * ffn_down_std
        # Layers never write into the bias channel, so it survives to the
        # output norm however large the attention/FFN contributions get.
        tensors[p + "attn_output.weight"][0, :] = 0.0
        tensors[p + "ffn_down.weight"][0, :] = 0.0
    return {name: t.astype(np.float32) for name, t in tensors.items()}


def write_vocab(writer: gguf.GGUFWriter, scores: list[float], types: list[int]) -> None:
    """The tiny vocabulary's scores, types, special tokens and chat template
    (every tiny generation model shares them)."""
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_TOKEN_ID)
    writer.add_bos_token_id(BOS_TOKEN_ID)
    writer.add_eos_token_id(EOS_TOKEN_ID)
    # <|im_end|> closes a ChatML turn, so it must end generation (EOG).
    writer.add_eot_token_id(IM_END_TOKEN_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def write_tiny_llama(path: pathlib.Path, *, seed: int = 0, fim: bool = False) -> pathlib.Path:
    """Write the tiny llama GGUF model to ``path`` and return ``path``.

    The file is a pure function of ``seed`` (and ``fim``): the same arguments
    give a byte-identical file, so tests can compare outputs across runs.
    ``fim=True`` adds the fill-in-the-middle tokens ``FIM_TOKENS`` (control
    tokens, never generated) and their metadata, for llama-server's /infill.
    """
    tokens, scores, types, generated_ids = _vocabulary()
    fim_ids = []
    if fim:
        for token in FIM_TOKENS:
            fim_ids.append(len(tokens))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL)
            scores.append(0.0)
    rng = np.random.default_rng(seed)
    tensors = _weights(len(tokens), generated_ids, rng)

    def hparams(writer: gguf.GGUFWriter) -> None:
        writer.add_head_count_kv(_N_HEAD_KV)
        writer.add_rope_dimension_count(_N_EMBD // _N_HEAD)
        writer.add_rope_freq_base(_ROPE_BASE)
        writer.add_layer_norm_rms_eps(_RMS_EPS)
        writer.add_vocab_size(len(tokens))

    def vocab(writer: gguf.GGUFWriter) -> None:
        write_vocab(writer, scores, types)
        for key, token_id in zip(_FIM_KEYS, fim_ids, strict=False):
            writer.add_uint32(key, token_id)

    return write_gguf(
        path,
        arch="llama",
        name="inferq-tiny-llama",
        shape=_SHAPE,
        tokenizer="llama",
        tokens=tokens,
        tensors=tensors,
        hparams=hparams,
        vocab=vocab,
    )
