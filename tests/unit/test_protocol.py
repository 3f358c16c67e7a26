"""The control protocol: every kind of damaged request gets its own ErrorCode; round trips."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pmx.supervisor.errors import ProtocolError
from pmx.supervisor.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Command,
    ErrorCode,
    Reply,
    Request,
    decode_publication,
    decode_reply,
    decode_request,
    encode_publication,
    encode_reply,
    encode_request,
    error_reply,
    event_topic,
    log_topic,
)

GOOD: dict[str, object] = {"v": 1, "id": "7f3a", "cmd": "stop", "args": {"target": "api"}}
_MISSING = object()


def envelope(**changes: object) -> bytes:
    """GOOD with some fields changed; a value of _MISSING drops the field."""
    body = {**GOOD, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not _MISSING}).encode()


def refused(data: bytes, code: ErrorCode, request_id: str | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        decode_request(data)
    error = caught.value
    assert error.code == code, str(error)
    assert error.request_id == request_id
    assert str(error) and "\n" not in str(error)
    return error


def test_good_request_is_decoded() -> None:
    assert decode_request(envelope()) == Request(Command.STOP, {"target": "api"}, "7f3a")


def test_args_default_to_an_empty_object() -> None:
    assert decode_request(envelope(args=_MISSING)) == Request(Command.STOP, {}, "7f3a")


# ---------------------------------------------------------------- size, encoding, JSON


def padded(size: int) -> bytes:
    """A good request of exactly `size` bytes."""
    empty = envelope(args={"pad": ""})
    data = envelope(args={"pad": "x" * (size - len(empty))})
    assert len(data) == size
    return data


def test_message_at_the_size_limit_is_accepted() -> None:
    assert decode_request(padded(MAX_MESSAGE_BYTES)).command is Command.STOP


def test_message_over_the_size_limit_is_too_large() -> None:
    error = refused(padded(MAX_MESSAGE_BYTES + 1), ErrorCode.TOO_LARGE)
    assert str(MAX_MESSAGE_BYTES) in str(error)


def test_huge_garbage_is_too_large_before_it_is_parsed() -> None:
    refused(b"\xff" * (MAX_MESSAGE_BYTES + 1), ErrorCode.TOO_LARGE)


@pytest.mark.parametrize("data", [b"\xff\xfe", b'{"v": 1, "id": "\xc3"}', b"\x80"])
def test_invalid_utf8_is_bad_json(data: bytes) -> None:
    error = refused(data, ErrorCode.BAD_JSON)
    assert "UTF-8" in str(error)


@pytest.mark.parametrize("data", [b"", b"{", b'{"v": 1,', b"hello", b"{'v': 1}", b'{"v": 1} x'])
def test_not_json_is_bad_json(data: bytes) -> None:
    refused(data, ErrorCode.BAD_JSON)


@pytest.mark.parametrize("data", [b"[]", b'[{"v": 1}]', b'"ping"', b"1", b"null", b"true"])
def test_json_that_is_not_an_object_is_not_object(data: bytes) -> None:
    refused(data, ErrorCode.NOT_OBJECT)


@pytest.mark.parametrize(
    "data",
    [b"[" * 100_000, b"{" * 100_000, b'{"v":1,"id":"a","cmd":"ping","args":{"x":' + b"[" * 100_000],
    ids=["arrays", "objects", "inside-args"],
)
def test_deeply_nested_json_is_bad_json(data: bytes) -> None:
    refused(data, ErrorCode.BAD_JSON)


# ---------------------------------------------------------------- envelope fields


@pytest.mark.parametrize("version", [2, 0, "1", True, None, [1], _MISSING])
def test_wrong_version_is_bad_version(version: object) -> None:
    refused(envelope(v=version), ErrorCode.BAD_VERSION, "7f3a")


def test_wrong_version_without_a_valid_id_has_no_request_id() -> None:
    refused(envelope(v=2, id=""), ErrorCode.BAD_VERSION, None)


@pytest.mark.parametrize("request_id", [_MISSING, "", "x" * 65, 5, None, ["a"]])
def test_bad_id_is_bad_field(request_id: object) -> None:
    error = refused(envelope(id=request_id), ErrorCode.BAD_FIELD, None)
    assert '"id"' in str(error)


def test_id_of_64_characters_is_accepted() -> None:
    assert decode_request(envelope(id="x" * 64)).id == "x" * 64


@pytest.mark.parametrize("cmd", [_MISSING, 5, None, ["stop"], {"name": "stop"}, True])
def test_cmd_not_a_string_is_bad_field(cmd: object) -> None:
    error = refused(envelope(cmd=cmd), ErrorCode.BAD_FIELD, "7f3a")
    assert '"cmd"' in str(error)


@pytest.mark.parametrize("cmd", ["__class__", "stop_all", "STOP", "Stop", "", " stop", "stop\n"])
def test_unknown_command(cmd: str) -> None:
    refused(envelope(cmd=cmd), ErrorCode.UNKNOWN_COMMAND, "7f3a")


def test_unknown_command_message_is_short() -> None:
    error = refused(envelope(cmd="x" * 10_000), ErrorCode.UNKNOWN_COMMAND, "7f3a")
    assert len(str(error)) < 100


@pytest.mark.parametrize("args", [[], ["target", "api"], "api", 1, None, True])
def test_args_not_an_object_is_bad_field(args: object) -> None:
    error = refused(envelope(args=args), ErrorCode.BAD_FIELD, "7f3a")
    assert '"args"' in str(error)


def test_extra_field_is_bad_field() -> None:
    error = refused(envelope(extra=1), ErrorCode.BAD_FIELD, "7f3a")
    assert "'extra'" in str(error)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("command", list(Command))
def test_request_round_trip(command: Command) -> None:
    request = Request(command, {"target": "api", "n": [1, 2.5, None, True], "ü": {"x": "ö"}}, "id-1")
    assert decode_request(encode_request(request)) == request


def test_request_default_id_round_trips() -> None:
    request = Request(Command.PING)
    assert 0 < len(request.id) <= 64
    assert decode_request(encode_request(request)) == request
    assert Request(Command.PING).id != request.id


def test_encoded_request_is_the_documented_envelope() -> None:
    body = json.loads(encode_request(Request(Command.STOP, {"target": "api"}, "7f3a")))
    assert body == {"v": PROTOCOL_VERSION, "id": "7f3a", "cmd": "stop", "args": {"target": "api"}}


def test_ok_reply_round_trip() -> None:
    reply = Reply("7f3a", True, {"stopped": [0, 1]})
    assert decode_reply(encode_reply(reply)) == reply


def test_error_reply_round_trip() -> None:
    reply = error_reply("7f3a", ErrorCode.NOT_FOUND, 'no app or id "apj"')
    assert reply == Reply("7f3a", False, {}, "not_found", 'no app or id "apj"')
    assert decode_reply(encode_reply(reply)) == reply
    body = json.loads(encode_reply(reply))
    assert body == {"v": 1, "id": "7f3a", "ok": False,
                    "error": {"code": "not_found", "message": 'no app or id "apj"'}}


def test_error_reply_without_request_id() -> None:
    reply = error_reply(None, ErrorCode.BAD_JSON, "message is not JSON")
    assert decode_reply(encode_reply(reply)).id == ""


@pytest.mark.parametrize(
    "body",
    [
        {"v": 2, "id": "a", "ok": True, "result": {}},
        {"v": 1, "ok": True, "result": {}},
        {"v": 1, "id": "a", "ok": "yes"},
        {"v": 1, "id": "a", "ok": True, "result": []},
        {"v": 1, "id": "a", "ok": False},
        {"v": 1, "id": "a", "ok": False, "error": "boom"},
    ],
)
def test_malformed_reply_is_bad_field(body: dict[str, object]) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_reply(json.dumps(body).encode())
    assert caught.value.code == ErrorCode.BAD_FIELD


# ---------------------------------------------------------------- publish stream


def test_topics_end_with_a_dot() -> None:
    assert log_topic("api") == "log.api:"
    assert event_topic("api") == "event.api:"


def test_topic_of_an_app_is_not_a_prefix_of_a_longer_name() -> None:
    assert not log_topic("api-v2").startswith(log_topic("api"))
    assert not event_topic("api-v2").startswith(event_topic("api"))
    assert not log_topic("api_v2").startswith(log_topic("api"))
    assert not log_topic("api@2").startswith(log_topic("api"))


def test_topic_of_an_app_is_not_a_prefix_of_a_dotted_name() -> None:
    assert not log_topic("api.v2").startswith(log_topic("api"))


def test_publication_round_trip() -> None:
    body = {"app": "api", "id": 0, "stream": "out", "lines": ["listening on 8000"]}
    frames = encode_publication(log_topic("api"), body)
    assert frames[0] == b"log.api:"
    assert decode_publication(frames) == ("log.api:", body)


def test_log_lines_travel_as_raw_bytes_and_arrive_as_strings() -> None:
    frames = [b"log.api:", b'{"app":"api","seq":3}', b"one\ntwo \xff\n"]
    assert decode_publication(frames) == (
        "log.api:", {"app": "api", "seq": 3, "lines": ["one", "two \ufffd"]})


@pytest.mark.parametrize("frames", [[], [b"log.api:"], [b"a", b"{}", b"x", b"y"]])
def test_publication_with_wrong_frame_count_is_bad_field(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_publication(frames)
    assert caught.value.code == ErrorCode.BAD_FIELD


# ---------------------------------------------------------------- properties


def check_decodes_or_refuses(data: bytes) -> None:
    try:
        request = decode_request(data)
    except ProtocolError as error:
        assert error.code in set(ErrorCode)
        return
    assert isinstance(request, Request)
    assert isinstance(request.command, Command)
    assert decode_request(encode_request(request)) == request


@given(st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    check_decodes_or_refuses(data)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, "1", True]) | JSON_VALUES,
        "id": st.text(max_size=70) | JSON_VALUES,
        "cmd": st.sampled_from([c.value for c in Command]) | st.text(max_size=12) | JSON_VALUES,
        "args": st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4) | JSON_VALUES,
        "extra": JSON_VALUES,
    },
)


@given(FIELDS)
def test_arbitrary_envelopes_decode_or_raise_protocol_error(body: dict[str, object]) -> None:
    check_decodes_or_refuses(json.dumps(body).encode())
