"""Write tiny random-weight Hugging Face models for tests that run real vLLM on CPU.

The GGUF models in ``tests.support.tinymodel`` / ``tinybert`` serve llama.cpp;
vLLM loads Hugging Face directories instead.  This module writes two, each a
few hundred kB, deterministic (fixed seeds: two runs write identical files):

* ``write_tiny_llama_hf``: a ``LlamaForCausalLM`` (hidden 64, two layers, two
  heads of 32, one KV head) with a byte-level BPE tokenizer trained here on a
  built-in corpus, a plain-text chat template and a generation config.  It
  also serves ``runner="pooling", convert="embed"``.
* ``write_tiny_reranker_hf``: a one-label ``BertForSequenceClassification``
  (a cross-encoder), whose tokenizer encodes (query, document) pairs as
  ``[CLS] query [SEP] document [SEP]`` with token type ids 0/1.

Run ``python -m tests.support.tinyhf OUT_DIR`` with the vLLM environment's
Python: it needs torch and transformers, which the main environment lacks.
"""

from __future__ import annotations

import logging
import pathlib
import sys
from typing import Final

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

__all__ = [
    "CHAT_TEMPLATE",
    "LLAMA_DIR",
    "RERANKER_DIR",
    "main",
    "write_tiny_llama_hf",
    "write_tiny_reranker_hf",
]

log = logging.getLogger(__name__)

LLAMA_DIR: Final = "tiny-llama-hf"
RERANKER_DIR: Final = "tiny-reranker-hf"

# vLLM's CPU attention only takes head sizes that are multiples of 32.
_HIDDEN: Final = 64
_HEADS: Final = 2
_FFN: Final = 128
_LAYERS: Final = 2
# The Llama's residual dims that carry token identity (see write_tiny_llama_hf).
_TOKEN_DIMS: Final = 47
# float32: vLLM's CPU attention takes it on every CPU, and its greedy output
# then matches transformers' token for token; bfloat16 kernels differ by CPU
# (AVX512-BF16, AMX or emulation).  The files are tiny either way.
_DTYPE: Final = torch.float32

# Zephyr-style turns as plain text (the role markers are ordinary BPE text,
# not special tokens); BOS comes from the template because chat prompts are
# tokenized without special tokens, completions with them (the post-processor).
CHAT_TEMPLATE: Final = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS: Final = """\
The quick brown fox jumps over the lazy dog. A cat sat on the mat and looked at the bird.
Hello world! How are you today? I am fine, thank you. What is your name? My name is Sam.
We walked to the river in the morning and watched the boats. The sun was warm and bright.
She reads a book every night before she goes to sleep. He writes short stories about cats.
The city has many roads, trains and buses. People work in offices, shops and schools.
Rain fell on the green hills; the wind blew through the trees and the flowers in the garden.
Please answer the question in one word: yes or no. The answer is yes. The answer is no.
Python is a programming language. Servers answer requests and models generate text.
Search the documents for the query and rank them by how well they match the question.
One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 100 2024.
{"name": "Alice", "age": 30, "city": "Paris", "tags": ["red", "blue"], "ok": true, "x": null}
Cats eat fish and drink milk. Dogs like to run and play with a ball in the park.
"""


def _train_tokenizer(specials: list[str], vocab_size: int, single: str, pair: str) -> Tokenizer:
    """A byte-level BPE (any text encodes, no unknown tokens) whose
    post-processor adds the special tokens, so ``add_special_tokens`` matters."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so merges have counts well above the trainer's minimum.
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(s, tok.token_to_id(s)) for s in specials],
    )
    return tok


def _fill(model: PreTrainedModel, seed: int) -> np.random.Generator:
    """Overwrite every parameter from numpy's generator, so the files depend
    only on ``seed``, not on torch's initializers.  Matrices get unit gain
    (std 1/sqrt(fan_in)), far above Hugging Face's 0.02, so every layer
    visibly shapes the outputs; norms and biases get small noise."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            shape = tuple(param.shape)
            if len(shape) == 2:
                values = rng.standard_normal(shape) / np.sqrt(shape[1])
            elif "norm" in name.lower() and name.endswith("weight"):
                values = 1.0 + 0.1 * rng.standard_normal(shape)
            else:
                values = 0.1 * rng.standard_normal(shape)
            param.copy_(torch.from_numpy(values.astype(np.float32)))
    return rng


def _save(path: pathlib.Path, model: PreTrainedModel, tok: PreTrainedTokenizerFast) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.to(_DTYPE).save_pretrained(path, safe_serialization=True)
    # chat_template inside tokenizer_config.json (not chat_template.jinja),
    # where every transformers version and vLLM find it.
    tok.save_pretrained(path, save_jinja_files=False)


def write_tiny_llama_hf(path: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Write the tiny causal Llama to the directory ``path`` and return it."""
    specials = ["<unk>", "<s>", "</s>"]
    raw = _train_tokenizer(specials, 512, single="<s> $A", pair="<s> $A <s> $B")
    unk, bos, eos = (raw.token_to_id(s) for s in specials)
    vocab = raw.get_vocab_size()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        # No real pad token: padding (vLLM never pads) reuses EOS like Llama's.
        pad_token="</s>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=_HIDDEN,
        intermediate_size=_FFN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        num_key_value_heads=1,
        head_dim=_HIDDEN // _HEADS,
        max_position_embeddings=2048,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=False,
        dtype=_DTYPE,
    )
    model = LlamaForCausalLM(config)
    rng = _fill(model, seed)
    # Greedy output walks one random cycle through the printable tokens and
    # never reaches EOS, so "generate N tokens" gets exactly N, varied ones.
    # The residual stream is split: dim 0 is a constant 1 (a bias for the
    # logits, since Llama's lm_head has none), dims 1.._TOKEN_DIMS carry the
    # current token's random embedding, the rest only what attention and MLP
    # write (their output rows into the first two parts are zeroed).  lm_head
    # row n is the embedding of the token n follows in the cycle, so the
    # current token picks the next one whatever the context; the context
    # part changes only the final norm's scale, not the argmax, and makes
    # pooled embeddings depend on the whole text.
    # Lone UTF-8 bytes, control bytes and special tokens stay out of the cycle.
    text = [raw.decode([i], skip_special_tokens=False) for i in range(vocab)]
    printable = [i for i, t in enumerate(text) if t.isascii() and t.isprintable()]
    cycle = rng.permutation(np.array([i for i in printable if i not in (unk, bos, eos)]))
    emb = np.zeros((vocab, _HIDDEN))
    emb[:, 0] = 1.0
    emb[:, 1 : _TOKEN_DIMS + 1] = rng.standard_normal((vocab, _TOKEN_DIMS))
    head = np.zeros((vocab, _HIDDEN))
    # Off-cycle tokens sit ~10 nats low: EOS is practically never sampled.
    head[:, 0] = -10.0
    # 0.13 puts the next token ~6 nats above the rest: greedy is the cycle,
    # sampling at temperature 1 still varies (p ~ 0.5 for the winner).
    head[np.roll(cycle, -1)] = 0.13 * emb[cycle]
    head[cycle, 0] = 0.0
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.from_numpy(emb.astype(np.float32)))
        model.lm_head.weight.copy_(torch.from_numpy(head.astype(np.float32)))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[: _TOKEN_DIMS + 1] = 0.0
            layer.mlp.down_proj.weight[: _TOKEN_DIMS + 1] = 0.0
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    _save(path, model, tok)
    return path


def write_tiny_reranker_hf(path: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Write the tiny one-label BERT cross-encoder to ``path`` and return it."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    raw = _train_tokenizer(
        specials,
        512,
        single="[CLS] $A [SEP]",
        # The sentence-pair layout BERT cross-encoders are trained on.
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
        # BERT needs the segment ids the pair template assigns.
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    config = BertConfig(
        vocab_size=raw.get_vocab_size(),
        hidden_size=_HIDDEN,
        intermediate_size=_FFN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        max_position_embeddings=512,
        type_vocab_size=2,
        pad_token_id=raw.token_to_id("[PAD]"),
        # One label: a relevance score per pair (a reranker).
        num_labels=1,
        dtype=_DTYPE,
    )
    model = BertForSequenceClassification(config)
    _fill(model, seed)
    # The pooled [CLS] state varies little between pairs: a gain of 8 on the
    # head spreads the logits, and a bias of -3 (measured: the mean logit is
    # then near 0) keeps vLLM's sigmoid out of saturation, so scores differ
    # visibly between pairs (0.3-0.97 for the pairs tried).
    with torch.no_grad():
        model.classifier.weight.mul_(8.0)
        model.classifier.bias.fill_(-3.0)
    _save(path, model, tok)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        log.error("usage: python -m tests.support.tinyhf OUT_DIR")
        return 2
    out = pathlib.Path(args[0])
    # save_pretrained's progress bar writes to stderr; logging is the output.
    hf_logging.disable_progress_bar()
    for name, write in ((LLAMA_DIR, write_tiny_llama_hf), (RERANKER_DIR, write_tiny_reranker_hf)):
        log.info("wrote %s", write(out / name))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(main())
