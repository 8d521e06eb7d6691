"""llama.cpp's logs reach `logging`: errors as warnings, except the ones an
aborted decode writes (the engine aborts batch steps on purpose)."""

from __future__ import annotations

import ctypes
import logging

import pytest

from schemas.llama_vocab import _log_callback

ERROR = 4  # GGML_LOG_LEVEL_ERROR


def _levels(caplog: pytest.LogCaptureFixture, text: bytes, level: int = ERROR) -> list[int]:
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="inferq.llama"):
        _log_callback(level, text, ctypes.c_void_p(0))
    return [r.levelno for r in caplog.records]


def test_an_aborted_decode_is_not_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    for line in (
        b"graph_compute: ggml_backend_sched_graph_compute_async failed with error 1\n",
        b"process_ubatch: failed to compute graph, compute status: 1\n",
        b"llama_decode: failed to decode, ret = 2\n",
    ):
        assert _levels(caplog, line) == [logging.DEBUG]


def test_other_errors_are_warnings(caplog: pytest.LogCaptureFixture) -> None:
    assert _levels(caplog, b"llama_decode: failed to decode, ret = -3\n") == [logging.WARNING]
    assert _levels(caplog, b"process_ubatch: failed to compute graph, compute status: -1\n") == [
        logging.WARNING
    ]
    assert _levels(caplog, b"load: some detail\n", level=2) == [logging.DEBUG]
