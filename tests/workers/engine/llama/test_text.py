from __future__ import annotations

from workers.engine.llama.text import StopBuffer, TextAssembler


def _feed(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    buffer = StopBuffer(stops)
    out = []
    for piece in pieces:
        text, stopped = buffer.push(piece)
        out.append(text)
        if stopped:
            return out, True
    out.append(buffer.flush())
    return out, False


def test_stop_string_split_across_pieces_is_never_emitted() -> None:
    out, stopped = _feed(["STOP"], ["Hello S", "T", "OP and more"])
    assert stopped
    assert "".join(out) == "Hello "
    # Nothing of the partial stop string leaked before the match.
    assert out[0] == "Hello "
    assert out[1] == ""


def test_held_back_prefix_is_released_when_it_does_not_complete() -> None:
    out, stopped = _feed(["STOP"], ["ab S", "T", "x"])
    assert not stopped
    assert out == ["ab ", "", "STx", ""]


def test_earliest_of_several_stops_wins() -> None:
    out, stopped = _feed(["world", "lo"], ["hello world"])
    assert stopped and "".join(out) == "hel"


def test_utf8_split_across_tokens_is_reassembled() -> None:
    assembler = TextAssembler([])
    snowman = "☃".encode()
    assert assembler.push(snowman[:1]) == ""
    assert assembler.push(snowman[1:]) == "☃"
    assert assembler.finish() == ""
    assert assembler.text == "☃"


def test_finish_flushes_held_text() -> None:
    assembler = TextAssembler(["</s>"])
    assert assembler.push(b"a </") == "a "
    assert assembler.finish() == "</"
    assert assembler.text == "a </"
