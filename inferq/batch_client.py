"""The I/O side of `inferq batch`: the Files and Batches API over httpx, every
failure (an error answer, no server, a dropped connection) as a CLIError; the
input file's endpoint."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

# Answers worth waiting out while following a batch (an API restart, a proxy).
TRANSIENT_STATUS = {502, 503, 504}


class CLIError(Exception):
    """Reported as one line on stderr, exit status 1."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if "detail" in body:
            return json.dumps(body["detail"])[:300]
    return json.dumps(body)[:300]


class Client:
    """The API over httpx; every failure becomes a CLIError."""

    def __init__(self, base_url: str, api_key: str | None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        timeout = httpx.Timeout(120.0, connect=10.0)
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        try:
            with self.http.stream(method, path, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    message = f"server answered {response.status_code}: {_error_message(response)}"
                    if response.status_code == 401:
                        message += " (set --api-key or INFERQ_API_KEY)"
                    raise CLIError(message, transient=response.status_code in TRANSIENT_STATUS)
                yield response
        except httpx.ConnectError as exc:
            raise CLIError(
                f"the inferq server is not reachable at {self.base_url} ({exc})", transient=True
            ) from None
        except httpx.TimeoutException:
            raise CLIError(f"no answer from {self.base_url} in time", transient=True) from None
        except httpx.TransportError as exc:
            raise CLIError(f"request to {self.base_url} failed: {exc}", transient=True) from None

    def json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        with self.stream(method, path, **kwargs) as response:
            response.read()
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise CLIError(
                f"{self.base_url}{path} did not answer with a JSON object: is it inferq?"
            )
        return data

    def batch(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        batch = self.json(method, path, **kwargs)
        if not isinstance(batch.get("id"), str) or not isinstance(batch.get("status"), str):
            raise CLIError(f"{self.base_url}{path} did not answer with a batch: is it inferq?")
        return batch

    def download(self, file_id: str | None, target: str | None) -> int:
        """A result file's bytes to `target` (stdout when None or '-'); the byte
        count. A file is written under a temporary name and renamed once
        complete. With no such file (no line failed, or none succeeded) a named
        target is still written, empty, so that a script finds it."""
        to_stdout = target is None or target == "-"
        if file_id is None:
            if not to_stdout:
                Path(str(target)).write_bytes(b"")
            return 0
        written = 0
        with self.stream("GET", f"/v1/files/{file_id}/content") as response:
            if to_stdout:
                sys.stdout.flush()
                for chunk in response.iter_bytes():
                    sys.stdout.buffer.write(chunk)
                    written += len(chunk)
                sys.stdout.buffer.flush()
                return written
            path = Path(str(target))
            partial = path.with_name(path.name + ".part")
            try:
                with partial.open("wb") as handle:
                    for chunk in response.iter_bytes():
                        handle.write(chunk)
                        written += len(chunk)
                partial.replace(path)
            finally:
                partial.unlink(missing_ok=True)
        return written


def first_url(path: Path) -> str | None:
    """The `url` of the file's first non-blank line, if it has one."""
    with path.open("rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                return None
            url = line.get("url") if isinstance(line, dict) else None
            return url if isinstance(url, str) else None
    return None
