"""The two systems of bench.versus and the prompts only it sends: `inferq up`
with extra model-config keys, llama-server at a given -np, and the shared
prefix workload (system prompts + questions)."""

from __future__ import annotations

import argparse
import random
import shlex
import signal
from pathlib import Path

import httpx

from bench import services
from bench.workload import TEMPERATURE, Job, make_prompt

# Prompt indices of each workload start far apart, so no two share a prompt.
PREFIX_OFFSET = 200_000
BATCH_OFFSET = 300_000
PROBE_OFFSET = 400_000


def inferq_yaml(model: Path, args: argparse.Namespace) -> str:
    """The model's config as one line of YAML; `--inferq-option KEY=VALUE`
    keys are passed through unchecked (the engine grows settings faster than
    this script could track them) and override the defaults."""
    keys = {"context_size": "2048", "parallel": "8", "threads": str(args.threads)}
    for option in args.inferq_option:
        key, _, value = option.partition("=")
        keys[key.strip()] = value.strip()
    extra = ", ".join(f"{k}: {v}" for k, v in keys.items())
    return (
        f"{{name: {services.MODEL_NAME}, backend: llama-cpp, "
        f"parameters: {{model: {model.name}}}, {extra}}}"
    )


def inferq_service(args: argparse.Namespace, work: Path, tag: str) -> services.Service:
    home = services.inferq_home(work / tag, args.model, inferq_yaml(args.model, args))
    return services.inferq_up(home, home / "inferq.log", drop=services.INFERQ_ENV_DROP)


def llama_label(np: int, args: argparse.Namespace) -> str:
    return f"llama-server -np {np}" + (" -kvu" if args.kvu else "")


def llama_argv(np: int, args: argparse.Namespace, cache_reuse: bool) -> list[str]:
    """llama-server's options after the binary, model and port. -c is the
    total context: per-slot context x np, split evenly across the slots, or
    one pool shared by all of them with -kvu."""
    argv = ["-t", str(args.threads), "-tb", str(args.threads), "-np", str(np)]
    argv += ["-c", str(args.ctx_per_slot * np), "--cont-batching", "-b", "512"]
    if args.kvu:
        argv.append("-kvu")
    if cache_reuse:
        argv += ["--cache-reuse", "256"]
    return argv


def llama_service(
    args: argparse.Namespace, work: Path, tag: str, np: int, cache_reuse: bool = False
) -> services.Service:
    port = services.free_port()
    cmd = [str(args.llama_server), "-m", str(args.model), *llama_argv(np, args, cache_reuse)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    return services.Service(
        cmd,
        port,
        work / f"{tag}.log",
        health_timeout=180,
        stop_signal=signal.SIGTERM,
        stop_timeout=30,
        own_session=False,
    )


def llama_shown(np: int, args: argparse.Namespace, cache_reuse: bool = False) -> str:
    """The command as the report shows it: no path of this machine."""
    argv = ["llama-server", "-m", f"models/{args.model.name}", *llama_argv(np, args, cache_reuse)]
    return shlex.join(argv)


def system_prompt(k: int) -> str:
    """The k-th shared system prompt: about 400 tokens of deterministic text."""
    stories = " ".join(make_prompt(i, seed=9000 + k).removesuffix(" Then the") for i in range(4))
    return f"You are narrator number {k}. Here is the story so far. {stories}\n\n"


def question(i: int) -> str:
    """About 30 tokens, different for every request."""
    rng = random.Random(7_000_003 + i)
    who = rng.choice(("farmer", "sailor", "baker", "pilot", "nurse", "wizard", "child"))
    what = rng.choice(("bridge", "lantern", "clock", "boat", "ladder", "mirror", "key"))
    return (
        f"Question {i}: in two or three sentences, what did the {who} do with the {what} "
        f"afterwards, and why did it matter to the rest of the village? Answer:"
    )


def prefix_jobs(start: int, count: int, prompts: int, seed: int) -> list[Job]:
    """`count` requests, each one of `prompts` system prompts (drawn at random,
    seeded, when more than one) followed by its own question. They send no
    sampling seed: chat clients rarely do, and inferq evaluates a seeded
    request's whole prompt (its draws must not depend on the cache)."""
    rng = random.Random(seed)
    jobs = []
    for i in range(start, start + count):
        k = rng.randrange(prompts) if prompts > 1 else 0
        jobs.append(Job(i, system_prompt(k) + question(i), seed=None))
    return jobs


def count_tokens(url: str, text: str) -> int | None:
    """Token count from the server's llama-server-style /tokenize."""
    try:
        reply = httpx.post(url + "/tokenize", json={"content": text}, timeout=30)
        reply.raise_for_status()
        return len(reply.json()["tokens"])
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def batch_line(i: int, max_tokens: int) -> dict[str, object]:
    body = {
        "model": services.MODEL_NAME,
        "prompt": make_prompt(i),
        "max_tokens": max_tokens,
        "temperature": TEMPERATURE,
        "seed": i,
        "ignore_eos": True,
    }
    return {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions", "body": body}
