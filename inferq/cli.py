"""The `inferq` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from api.main import create_app
    from schemas.settings import get_settings

    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=args.host or settings.host,
        port=args.port or settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        # Keep-alive pooled clients (openai, httpx) reuse connections.
        timeout_keep_alive=30,
    )
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from workers.main import run_worker

    return run_worker(args.model, gpu=args.gpu)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from inferq.migrate import downgrade, upgrade
    from schemas.settings import get_settings

    url = get_settings().database_url
    if args.downgrade:
        downgrade(url, args.downgrade)
    else:
        upgrade(url, args.revision)
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from inferq.embedded import run_embedded

    return run_embedded(host=args.host, port=args.port)


def _cmd_demo(args: argparse.Namespace) -> int:
    from inferq.demo import install_demo_model

    install_demo_model(Path(args.models_dir))
    return 0


def _gpus(value: str) -> str:
    """`--gpu 0` or `--gpu 0,1`: GPU indices, as CUDA_VISIBLE_DEVICES takes them."""
    parts = value.split(",")
    if not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0 or 0,1, not {value!r}")
    return ",".join(part.strip() for part in parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inferq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start everything (Redis, database, API, workers)")
    up.add_argument("--host", default=None)
    up.add_argument("--port", type=int, default=None)
    up.set_defaults(func=_cmd_up)

    api = sub.add_parser("api", help="run the HTTP API")
    api.add_argument("--host", default=None)
    api.add_argument("--port", type=int, default=None)
    api.set_defaults(func=_cmd_api)

    worker = sub.add_parser("worker", help="run a worker for one model")
    worker.add_argument("--model", required=True, help="model name from the registry")
    worker.add_argument(
        "--gpu",
        type=_gpus,
        default=None,
        help="GPU index to pin to; K,L,... for a vLLM model split over several "
        "(tensor_parallel_size)",
    )
    worker.set_defaults(func=_cmd_worker)

    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--revision", default="head")
    migrate.add_argument("--downgrade", metavar="REVISION", default=None)
    migrate.set_defaults(func=_cmd_migrate)

    demo = sub.add_parser("demo-model", help="install the gemma-3-270m demo model")
    demo.add_argument("--models-dir", default=os.environ.get("INFERQ_MODELS_DIR", "models"))
    demo.set_defaults(func=_cmd_demo)

    from inferq import batch_cli, keys_cli, usage_cli

    batch_cli.add_parser(sub)
    keys_cli.add_parser(sub)
    usage_cli.add_parser(sub)

    args = parser.parse_args(argv)
    _setup_logging(os.environ.get("INFERQ_LOG_LEVEL", "INFO"))
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
