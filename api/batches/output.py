"""A finished batch's output and error files, one line per request, in input
order, streamed from the database page by page into the Files store."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Engine, select

from api.embeddings.bodies import embedding_body, rerank_body
from api.files import store as files_store
from api.openai import bodies
from schemas import batch_line_reads
from schemas import batches as b
from schemas.events import Done, Embeddings, ErrorEvent, decode, error_body
from schemas.jobs import EmbedJob, GenerateJob
from schemas.tables import BATCHES

log = logging.getLogger("inferq.batches")

PAGE = 1000

_NOT_RUN = {
    b.EXPIRED: (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
    b.CANCELLED: ("batch_cancelled", "This request was not executed: the batch was cancelled."),
}


def _rows(
    db: Engine, batch_id: str, states: tuple[str, ...], keepalive: Callable[[], None] | None
) -> Iterator[Any]:
    last = -1
    while True:
        if keepalive is not None:
            keepalive()
        page = batch_line_reads.result_page(
            db, batch_id=batch_id, states=states, after=last, limit=PAGE
        )
        yield from page
        if len(page) < PAGE:
            return
        last = page[-1].line


def response(row: Any) -> tuple[int, dict[str, Any]]:
    """(status code, body) of a line that ran or was rejected."""
    result = row.result or {}
    if "status_code" in result:
        return int(result["status_code"]), result["body"]
    event = decode(orjson.dumps(result["event"]))
    if isinstance(event, ErrorEvent):
        body = error_body(event.message, type=event.error_type, code=event.code, param=event.param)
        return event.status, body
    job, options = row.job["payload"], row.job.get("options", {})
    if isinstance(event, Embeddings):
        embed = EmbedJob.model_validate(job)
        if embed.kind == "rerank":
            body = rerank_body(
                row.model,
                event,
                options["texts"],
                options.get("top_n"),
                options.get("return_documents", True),
            )
            return 200, body
        return 200, embedding_body(
            row.model, event, options.get("encoding_format", "float"), options.get("dimensions")
        )
    assert isinstance(event, Done)
    created = int((row.finished_at or datetime.now()).timestamp())
    return 200, bodies.openai_body(GenerateJob.model_validate(job), created, {}, event)


def _line(row: Any) -> bytes:
    if row.state in _NOT_RUN:
        code, message = _NOT_RUN[row.state]
        out: dict[str, Any] = {
            "id": row.request_id,
            "custom_id": row.custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    else:
        status, body = response(row)
        out = {
            "id": row.request_id,
            "custom_id": row.custom_id,
            "response": {"status_code": status, "request_id": row.request_id, "body": body},
            "error": None,
        }
    return orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def _write(
    db: Engine,
    batch_id: str,
    name: str,
    states: tuple[str, ...],
    keepalive: Callable[[], None] | None,
    owner: str | None,
) -> str | None:
    lines = (_line(row) for row in _rows(db, batch_id, states, keepalive))
    first = next(lines, None)
    if first is None:
        return None

    def chunks() -> Iterator[bytes]:
        yield first
        yield from lines

    record = files_store.create_file(
        db,
        filename=f"{batch_id}_{name}.jsonl",
        purpose="batch_output",
        chunks=chunks(),
        max_bytes=None,
        owner=owner,
    )
    file_id: str = record.id
    return file_id


def write_files(
    db: Engine, *, batch_id: str, keepalive: Callable[[], None] | None = None
) -> tuple[str | None, str | None]:
    """(output_file_id, error_file_id); None where no line belongs there.
    `keepalive` is called before every page of lines (and may raise to stop).
    The files belong to whoever owns the batch."""
    with db.connect() as conn:
        owner = conn.execute(select(BATCHES.c.owner).where(BATCHES.c.id == batch_id)).scalar()
    output = _write(db, batch_id, "output", (b.DONE,), keepalive, owner)
    try:
        errors = _write(
            db, batch_id, "errors", (b.FAILED, b.EXPIRED, b.CANCELLED), keepalive, owner
        )
    except BaseException:
        discard(db, output, None)
        raise
    return output, errors


def discard(db: Engine, *file_ids: str | None) -> None:
    """Remove result files a failed finalization wrote; best effort (a file
    left over is only a stray `batch_output` file)."""
    for file_id in file_ids:
        if file_id is None:
            continue
        try:
            files_store.delete_file(db, file_id=file_id)
        except Exception:
            log.warning("could not remove the unused result file %s", file_id, exc_info=True)
