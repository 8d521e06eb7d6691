"""Write tiny random-weight BERT GGUF models (embedding and reranker) for tests.

The embeddings and rerank code paths (llama.cpp loading a non-causal encoder,
WordPiece tokenization, pooled output per sequence) should run for real
without downloading a model.  ``write_tiny_bert`` and ``write_tiny_reranker``
write deterministic GGUF files (well under 1 MB, written in milliseconds)
that llama.cpp loads as ordinary ``bert`` models, laid out the way llama.cpp's
own converter lays out a Hugging Face ``BertModel``:

* a WordPiece (``tokenizer.ggml.model = "bert"``) vocabulary: the five BERT
  special tokens, a few hundred lower-case English words, common suffixes and
  every single letter and digit (word-initial and continuation), so any
  lower-case ASCII word tokenizes without ``[UNK]``;
* token, token-type and position embeddings with an embedding LayerNorm,
  post-norm encoder blocks with biases everywhere and a GELU FFN;
* mean or CLS pooling (``bert.pooling_type``) for the embedding model; RANK
  pooling plus a one-label classification head for the reranker.

The weights are random (``numpy.random.default_rng(seed)``): the outputs mean
nothing, but they are deterministic, depend on every input token, and differ
between texts, which is all the tests need.
"""

from __future__ import annotations

import pathlib
from typing import Final, Literal

import gguf
import numpy as np
import numpy.typing as npt

from tests.support.gguf_file import Shape, write_gguf

__all__ = [
    "BERT_CLS_TOKEN",
    "BERT_CLS_TOKEN_ID",
    "BERT_MASK_TOKEN",
    "BERT_MASK_TOKEN_ID",
    "BERT_N_EMBD",
    "BERT_PAD_TOKEN",
    "BERT_PAD_TOKEN_ID",
    "BERT_SEP_TOKEN",
    "BERT_SEP_TOKEN_ID",
    "BERT_UNK_TOKEN",
    "BERT_UNK_TOKEN_ID",
    "write_tiny_bert",
    "write_tiny_reranker",
]

# --- special tokens --------------------------------------------------------

BERT_PAD_TOKEN: Final = "[PAD]"
BERT_UNK_TOKEN: Final = "[UNK]"
BERT_CLS_TOKEN: Final = "[CLS]"
BERT_SEP_TOKEN: Final = "[SEP]"
BERT_MASK_TOKEN: Final = "[MASK]"

# llama.cpp's WPM defaults are bert-base-uncased's ids (pad 0, unk 100,
# cls/bos 101, sep 102, mask 103); this vocabulary is smaller, so every id is
# written explicitly.
BERT_PAD_TOKEN_ID: Final = 0
BERT_UNK_TOKEN_ID: Final = 1
BERT_CLS_TOKEN_ID: Final = 2
BERT_SEP_TOKEN_ID: Final = 3
BERT_MASK_TOKEN_ID: Final = 4

# --- architecture ----------------------------------------------------------

BERT_N_EMBD: Final = 64
_N_LAYER: Final = 2
_N_HEAD: Final = 4
_N_FF: Final = 128
# Like MiniLM/bert-base: position_embd has one row per trainable position.
_N_CTX_TRAIN: Final = 512
_N_TOKEN_TYPES: Final = 2
_NORM_EPS: Final = 1e-12
_SHAPE: Final = Shape(
    n_ctx_train=_N_CTX_TRAIN, n_embd=BERT_N_EMBD, n_layer=_N_LAYER, n_ff=_N_FF, n_head=_N_HEAD
)
# Init gains (std * sqrt(fan_in)).  A Q/K gain above 1 keeps attention from
# being a near-uniform average over the sequence; V/O/FFN gains of 1 keep
# each residual branch about as large as its input.  With these, different
# texts measure pooled cosines of about 0.4-0.86 (see test_tinybert).
_QK_GAIN: Final = 2.0
_VO_GAIN: Final = 1.0
_FFN_GAIN: Final = 1.0
# Position embeddings are smaller than token embeddings so two texts of the
# same length still differ mostly by their words.
_POS_STD: Final = 0.3

Pooling = Literal["mean", "cls"]
_POOLING: Final[dict[str, gguf.PoolingType]] = {
    "mean": gguf.PoolingType.MEAN,
    "cls": gguf.PoolingType.CLS,
}

# WordPiece marks the start of a word; llama.cpp's GGUF spelling is a U+2581
# prefix on word-initial pieces and no prefix on continuations ("##ing" in a
# Hugging Face vocab is "ing" here).
_WORD_START: Final = "\u2581"

_WORDS: Final = tuple(
    " ".join(
        (
            "the a an of and or to in on at for with from by as is are was were be been",
            "it this that these those he she they we you i my your our their his her",
            "what which who how when where why not no yes all some many more most",
            "do does did have has had can could will would should may might must",
            "cat dog bird fish horse cow sheep mouse lion tiger bear animal pet",
            "sun moon star sky rain snow wind cloud storm weather hot cold warm day night",
            "tree flower grass leaf forest river lake sea ocean mountain hill road city",
            "house home room door window table chair bed kitchen garden car bus train",
            "food bread rice apple orange banana milk water tea coffee cake soup meal",
            "eat drink cook sleep walk run jump swim read write sing play work talk",
            "go come see look find make take give get know think say tell ask help",
            "big small long short old new young good bad fast slow happy sad red blue",
            "green black white one two three four five first last next same other",
            "book story word page letter paper school teacher student class lesson",
            "computer program code data file server model query document search",
            "language python music song film game sport ball team player price money",
            "time year week hour minute today morning evening question answer hello world",
            "man woman child people friend family mother father name place thing",
            "mat sat very just only also then than there here about into over under",
        )
    ).split()
)
# Continuations after a word-initial piece, so "walking" is "walk" + "ing".
_SUFFIXES: Final = ("s", "es", "ed", "ing", "er", "est", "ly", "ness", "ment", "ion", "al")
# BERT splits every punctuation mark into a word of its own, so marks only
# need a word-initial spelling.
_PUNCT: Final = tuple(".,!?;:'\"()-/")


def _vocabulary() -> tuple[list[str], list[int]]:
    """Return (tokens, token types), in id order."""
    tokens = [BERT_PAD_TOKEN, BERT_UNK_TOKEN, BERT_CLS_TOKEN, BERT_SEP_TOKEN, BERT_MASK_TOKEN]
    # llama.cpp's converter marks all five as CONTROL (they are "special"
    # added tokens in tokenizer.json); do the same so the tiny model behaves
    # like a converted one (e.g. none of them renders as text).
    types = [gguf.TokenType.CONTROL] * len(tokens)

    pieces: list[str] = []
    pieces += [_WORD_START + w for w in dict.fromkeys(_WORDS)]
    pieces += list(_SUFFIXES)
    # Letters and digits in both positions are the fallback: llama.cpp (like
    # Hugging Face) turns a whole word into [UNK] if any position has no
    # piece, so with these only non-ASCII words become [UNK].
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    pieces += [_WORD_START + ch for ch in letters if _WORD_START + ch not in pieces]
    pieces += [ch for ch in letters if ch not in pieces]
    pieces += [_WORD_START + p for p in _PUNCT]

    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    return tokens, [int(t) for t in types]


def _normal(
    rng: np.random.Generator, shape: tuple[int, ...], std: float
) -> npt.NDArray[np.float64]:
    return rng.standard_normal(shape) * std


def _linear(
    tensors: dict[str, npt.NDArray[np.float64]],
    name: str,
    rng: np.random.Generator,
    shape: tuple[int, int],
    std: float,
) -> None:
    """A layer's weight (random, `std`) and then its small random bias."""
    tensors[name + ".weight"] = _normal(rng, shape, std)
    tensors[name + ".bias"] = _normal(rng, shape[:1], 0.1)


def _norm(
    tensors: dict[str, npt.NDArray[np.float64]], name: str, rng: np.random.Generator, d: int
) -> None:
    """A LayerNorm: gains near 1 and small biases, as in a trained BERT;
    exactly ones/zeros would leave the norms untested (a wrong weight/bias
    mapping would go unnoticed)."""
    tensors[name + ".weight"] = 1.0 + _normal(rng, (d,), 0.1)
    tensors[name + ".bias"] = _normal(rng, (d,), 0.1)


def _weights(n_vocab: int, rng: np.random.Generator) -> dict[str, npt.NDArray[np.float32]]:
    """Build all tensors, in numpy (row-major) shapes and llama.cpp's names.

    GGUF stores dimensions reversed relative to numpy, so a numpy array of
    shape (n_out, n_in) is the ggml tensor {n_in, n_out} llama.cpp expects,
    the same orientation as a torch ``nn.Linear`` weight.
    """
    d = BERT_N_EMBD
    tensors: dict[str, npt.NDArray[np.float64]] = {
        "token_embd.weight": _normal(rng, (n_vocab, d), 1.0),
        # llama.cpp adds row 0 ("sentence A") to every token; rows beyond it
        # only have to exist (the loader checks the shape).
        "token_types.weight": _normal(rng, (_N_TOKEN_TYPES, d), 0.1),
        "position_embd.weight": _normal(rng, (_N_CTX_TRAIN, d), _POS_STD),
    }
    _norm(tensors, "token_embd_norm", rng, d)
    qk_std = _QK_GAIN / np.sqrt(d)
    vo_std = _VO_GAIN / np.sqrt(d)
    up_std = _FFN_GAIN / np.sqrt(d)
    down_std = _FFN_GAIN / np.sqrt(_N_FF)
    for i in range(_N_LAYER):
        p = f"blk.{i}."
        _linear(tensors, p + "attn_q", rng, (d, d), qk_std)
        _linear(tensors, p + "attn_k", rng, (d, d), qk_std)
        _linear(tensors, p + "attn_v", rng, (d, d), vo_std)
        _linear(tensors, p + "attn_output", rng, (d, d), vo_std)
        _norm(tensors, p + "attn_output_norm", rng, d)
        _linear(tensors, p + "ffn_up", rng, (_N_FF, d), up_std)
        _linear(tensors, p + "ffn_down", rng, (d, _N_FF), down_std)
        _norm(tensors, p + "layer_output_norm", rng, d)
    return {name: t.astype(np.float32) for name, t in tensors.items()}


def _classifier(rng: np.random.Generator) -> dict[str, npt.NDArray[np.float32]]:
    """A BertForSequenceClassification head with one label.

    llama.cpp's RANK pooling takes the [CLS] row, applies ``cls`` + tanh (the
    Hugging Face pooler) and then ``cls.output`` (the classifier), giving one
    float per sequence.
    """
    d = BERT_N_EMBD
    tensors = {
        "cls.weight": _normal(rng, (d, d), 1.0 / np.sqrt(d)),
        "cls.bias": _normal(rng, (d,), 0.1),
        # A gain of 3 keeps scores apart (measured spread ~1 for the test
        # pairs) instead of all near the bias.
        "cls.output.weight": _normal(rng, (1, d), 3.0 / np.sqrt(d)),
        "cls.output.bias": _normal(rng, (1,), 0.1),
    }
    return {name: t.astype(np.float32) for name, t in tensors.items()}


def _write(
    path: pathlib.Path,
    *,
    name: str,
    pooling: gguf.PoolingType,
    tensors: dict[str, npt.NDArray[np.float32]],
    tokens: list[str],
    types: list[int],
    labels: list[str] | None = None,
) -> pathlib.Path:
    def hparams(writer: gguf.GGUFWriter) -> None:
        writer.add_layer_norm_eps(_NORM_EPS)
        # BERT attends in both directions; llama.cpp reads this to build a
        # non-causal mask (and then needs the whole batch in one ubatch).
        writer.add_causal_attention(False)
        writer.add_pooling_type(pooling)
        if labels is not None:
            # Its length is llama_model_n_cls_out: the floats per sequence.
            writer.add_classifier_output_labels(labels)

    def vocab(writer: gguf.GGUFWriter) -> None:
        writer.add_token_types(types)
        writer.add_token_type_count(_N_TOKEN_TYPES)
        # The WPM tokenizer always wraps text as BOS ... SEP, so BOS is [CLS].
        # EOS = SEP and add_eos make llama-server's rerank prompt
        # "[CLS] query [SEP] document [SEP]", Hugging Face's sentence-pair form
        # (the special-token flags are what llama.cpp's converter writes for
        # BERT tokenizers).
        writer.add_bos_token_id(BERT_CLS_TOKEN_ID)
        writer.add_eos_token_id(BERT_SEP_TOKEN_ID)
        writer.add_sep_token_id(BERT_SEP_TOKEN_ID)
        writer.add_unk_token_id(BERT_UNK_TOKEN_ID)
        writer.add_pad_token_id(BERT_PAD_TOKEN_ID)
        writer.add_mask_token_id(BERT_MASK_TOKEN_ID)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(True)
        writer.add_add_sep_token(False)

    return write_gguf(
        path,
        arch="bert",
        name=name,
        shape=_SHAPE,
        tokenizer="bert",
        tokens=tokens,
        tensors=tensors,
        hparams=hparams,
        vocab=vocab,
    )


def write_tiny_bert(
    path: pathlib.Path, *, seed: int = 0, pooling: Pooling = "mean"
) -> pathlib.Path:
    """Write the tiny BERT embedding model to ``path`` and return ``path``.

    ``pooling`` is the model's pooling type ("mean" or "cls"), what a context
    with ``pooling_type`` left unspecified uses.  The file is a pure function
    of the arguments (byte-identical for the same ones).
    """
    tokens, types = _vocabulary()
    rng = np.random.default_rng(seed)
    return _write(
        path,
        name="inferq-tiny-bert",
        pooling=_POOLING[pooling],
        tensors=_weights(len(tokens), rng),
        tokens=tokens,
        types=types,
    )


def write_tiny_reranker(path: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Write the tiny BERT reranker (one-label classification head, RANK
    pooling) to ``path`` and return ``path``.

    The encoder weights are those ``write_tiny_bert`` writes for the same
    seed; the head is drawn after them.
    """
    tokens, types = _vocabulary()
    rng = np.random.default_rng(seed)
    tensors = _weights(len(tokens), rng)
    tensors.update(_classifier(rng))
    return _write(
        path,
        name="inferq-tiny-reranker",
        pooling=gguf.PoolingType.RANK,
        tensors=tensors,
        tokens=tokens,
        types=types,
        # What llama.cpp's converter writes for a one-label
        # BertForSequenceClassification (its config's id2label).
        labels=["LABEL_0"],
    )
