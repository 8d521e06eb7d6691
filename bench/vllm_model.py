"""A random-weight Llama of a chosen size, for benchmarks of the vLLM worker:
the architecture and tokenizer of the test suite's tiny model
(tests/support/tinyhf.py writes it), scaled up. No hub: nothing to download.

Run with the vLLM environment's Python (it has torch and transformers):

    .venv-vllm/bin/python -m bench.vllm_model TINY_DIR OUT_DIR --hidden 768 --layers 12
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

log = logging.getLogger("bench.vllm_model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def write_model(tiny: Path, out: Path, *, hidden: int, layers: int, heads: int, kv: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny)
    config.hidden_size = hidden
    config.num_hidden_layers = layers
    config.num_attention_heads = heads
    config.num_key_value_heads = kv
    config.head_dim = hidden // heads
    config.intermediate_size = hidden * 8 // 3 // 64 * 64
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    params = sum(p.numel() for p in model.parameters())
    log.info("wrote %s: %d layers of %d, %.1fM parameters", out, layers, hidden, params / 1e6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tiny", type=Path, help="the tiny model's directory (its tokenizer)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    write_model(
        args.tiny,
        args.out,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv=args.kv_heads,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
