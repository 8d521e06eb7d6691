"""Check inferq.convert_bert's all-MiniLM-L6-v2 GGUF against an independent
reference: Hugging Face transformers' BertModel on the same safetensors.

The reference is what sentence-transformers computes for all-MiniLM-L6-v2:
BertModel's last hidden state, mean-pooled over the attention mask, then L2
normalised.  It runs in a throwaway virtual environment outside the
repository (torch and transformers are no dependency of inferq):

    python3 -m venv .refvenv
    .refvenv/bin/pip install torch==2.13.0
    .refvenv/bin/pip install transformers tokenizers safetensors
    .refvenv/bin/pip uninstall -y torchvision torchaudio torchcodec

    .venv/bin/python bench/minilm_reference.py --ref-python .refvenv/bin/python [--f16]

The script (in inferq's venv) converts the model, then runs itself under
--ref-python in "reference" mode, which reads the files from the package's
model.zip and prints token ids and embeddings as JSON.  It then compares:

* token ids: llama.cpp's WordPiece tokenizer on the GGUF against
  ``tokenizers.Tokenizer`` on the model's tokenizer.json (exact match), for
  the sentences and for tokenizer-only edge cases;
* embeddings: llama.cpp (all sentences packed into one batch, mean pooling
  from the GGUF, normalised here) against the reference; every cosine must
  exceed --min-cosine (0.999).

Exits 1 when any check fails.  Not part of the test suite.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file (python bench/minilm_reference.py): make `inferq` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("bench.minilm_reference")

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on stage.",
    "Machine learning models turn text into vectors!",
    "I don't think it's going to rain today, do you?",
    "Café déjà vu: naïve résumé at the Zürich hôtel",
    "GPU memory: 80 GB (H100), 3.5x faster than 2021's A100-40GB",
    "Embeddings power semantic search, clustering and re-ranking of documents.",
    "東京 is the capital of Japan; 北京 is the capital of China.",
)
# Tokenization only: inputs where a WordPiece port could plausibly diverge.
EDGE_CASES = (
    "",
    "   leading and trailing   spaces   ",
    "tabs\tand\nnew\r\nlines",
    "UPPER lower MiXeD",
    "e-mail: someone@example.com, #hashtag $5 ~tilde ^caret `tick`",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "emoji 🙂 and ✓ check",
    "Ελληνικά кириллица العربية",
)
# Known divergence, reported but not a failure: Hugging Face's WordPiece
# turns a word longer than max_input_chars_per_word (100) into one [UNK];
# llama.cpp's has no such limit and splits it into pieces.
KNOWN_DIFFERENT = ("a" * 120,)
ALL_TEXTS = SENTENCES + EDGE_CASES + KNOWN_DIFFERENT


# --- reference mode (runs under --ref-python: torch + transformers) ---------


def reference(archive: Path) -> dict[str, Any]:
    """Token ids and normalised mean-pooled embeddings from transformers."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, BertModel

    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(archive).extractall(tmp)
        # tokenizer.json ships with padding to 128 and truncation enabled;
        # plain ids of the text are the reference, so both are switched off.
        tok = Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        ids = {t: list(tok.encode(t).ids) for t in ALL_TEXTS}

        hf_tok = AutoTokenizer.from_pretrained(tmp)
        model = BertModel.from_pretrained(tmp, torch_dtype=torch.float32)
        model.eval()
        batch = hf_tok(list(SENTENCES), padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        # sentence-transformers' Pooling(mean) then Normalize.
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        embeddings = torch.nn.functional.normalize(mean, p=2, dim=1)
        # The transformers tokenizer must agree with tokenizer.json itself.
        for i, text in enumerate(SENTENCES):
            n = int(batch["attention_mask"][i].sum())
            if [int(x) for x in batch["input_ids"][i][:n]] != ids[text]:
                raise RuntimeError(f"AutoTokenizer and tokenizer.json disagree on {text!r}")
        return {
            "versions": {"torch": str(torch.__version__), "transformers": _version("transformers")},
            "ids": ids,
            "embeddings": {t: [float(x) for x in embeddings[i]] for i, t in enumerate(SENTENCES)},
        }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# --- llama.cpp side (runs in inferq's venv) ---------------------------------


def _drop_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp's logs would bury the report."""


def llama_side(gguf_path: Path) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    import llama_cpp
    import numpy as np

    callback = llama_cpp.llama_log_callback(_drop_log)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    cparams = llama_cpp.llama_context_default_params()
    # Non-causal: the whole batch must fit one ubatch; one sequence id per
    # sentence.
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 1024
    cparams.n_seq_max = len(SENTENCES)
    cparams.embeddings = True
    cparams.n_threads = cparams.n_threads_batch = 2
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    vocab = llama_cpp.llama_model_get_vocab(model)
    try:
        if llama_cpp.llama_pooling_type(ctx) != llama_cpp.LLAMA_POOLING_TYPE_MEAN:
            raise RuntimeError("the GGUF does not ask for mean pooling")

        def tokenize(text: str) -> list[int]:
            data = text.encode()
            buf = (llama_cpp.llama_token * (len(data) + 8))()
            n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), True, False)
            if n < 0:
                raise RuntimeError(f"tokenize failed on {text!r}")
            return [int(t) for t in buf[:n]]

        ids = {t: tokenize(t) for t in ALL_TEXTS}
        n_tokens = sum(len(ids[t]) for t in SENTENCES)
        batch = llama_cpp.llama_batch_init(n_tokens, 0, 1)
        k = 0
        for seq, text in enumerate(SENTENCES):
            for pos, token in enumerate(ids[text]):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = token, pos, 1
                batch.seq_id[k][0], batch.logits[k] = seq, True
                k += 1
        batch.n_tokens = n_tokens
        rc = llama_cpp.llama_decode(ctx, batch)
        llama_cpp.llama_batch_free(batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        n_embd = llama_cpp.llama_model_n_embd(model)
        embeddings: dict[str, list[float]] = {}
        for seq, text in enumerate(SENTENCES):
            ptr = llama_cpp.llama_get_embeddings_seq(ctx, seq)
            v = np.ctypeslib.as_array(ptr, shape=(n_embd,)).astype(np.float64)
            embeddings[text] = [float(x) for x in v / np.linalg.norm(v)]
        return ids, embeddings
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def compare(args: argparse.Namespace) -> int:
    import numpy as np

    from inferq.convert_bert import convert_minilm, minilm_archive

    archive = minilm_archive()
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = args.gguf or Path(tmp) / "minilm.gguf"
        if args.gguf is None or not gguf_path.exists():
            convert_minilm(gguf_path, ftype="f16" if args.f16 else "f32")
        out = subprocess.run(
            [str(args.ref_python), __file__, "reference", str(archive)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        ref = json.loads(out)
        ids, embeddings = llama_side(gguf_path)

    log.info("reference: torch %(torch)s, transformers %(transformers)s", ref["versions"])
    failed = False
    for text in ALL_TEXTS:
        if ids[text] != ref["ids"][text]:
            if text in KNOWN_DIFFERENT:
                log.warning("token ids differ, as known, for %r", text[:40])
                continue
            failed = True
            log.error(
                "token ids differ for %r:\n  gguf %s\n  ref  %s", text, ids[text], ref["ids"][text]
            )
    log.info("token ids: %d texts compared", len(ALL_TEXTS))
    cosines = []
    for text in SENTENCES:
        a, b = np.asarray(embeddings[text]), np.asarray(ref["embeddings"][text])
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        cosines.append(cos)
        log.info("cosine %.7f  max|diff| %.2e  %r", cos, float(np.abs(a - b).max()), text)
    log.info("min cosine %.7f (threshold %s)", min(cosines), args.min_cosine)
    if min(cosines) <= args.min_cosine:
        failed = True
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["reference"]:
        # Child mode: JSON on stdout is the whole interface.
        sys.stdout.write(json.dumps(reference(Path(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--ref-python", type=Path, default=Path(".refvenv/bin/python"))
    parser.add_argument("--gguf", type=Path, help="use (or write) this GGUF, not a temporary one")
    parser.add_argument("--f16", action="store_true", help="convert with F16 weight matrices")
    parser.add_argument("--min-cosine", type=float, default=0.999)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)
    return compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
