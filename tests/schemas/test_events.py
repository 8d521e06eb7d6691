from __future__ import annotations

import json

from schemas.events import (
    Accepted,
    ChoiceResult,
    Done,
    ErrorEvent,
    TokenEvent,
    Usage,
    decode,
    encode,
    encode_token,
)


def test_token_event_carries_a_json_literal_the_api_can_splice() -> None:
    raw = encode_token(3, 'he said "hi"\n\u00e9')
    event = decode(raw)
    assert isinstance(event, TokenEvent)
    assert event.index == 3
    assert event.text == 'he said "hi"\n\u00e9'
    # Spliced into a JSON document, the literal parses back to the text.
    doc = json.loads(b'{"content":' + event.text_json + b"}")
    assert doc["content"] == 'he said "hi"\n\u00e9'


def test_control_events_round_trip() -> None:
    done = Done(
        choices=[ChoiceResult(0, "length", "abc")],
        usage=Usage(5, 7),
        ttft_ms=12.5,
        duration_ms=40.0,
    )
    assert decode(encode(done)) == done
    assert decode(encode(Accepted(prompt_tokens=9))) == Accepted(prompt_tokens=9)
    err = ErrorEvent("too long", error_type="invalid_request_error", code="x", status=400)
    assert decode(encode(err)) == err
    assert done.usage.total_tokens == 12
