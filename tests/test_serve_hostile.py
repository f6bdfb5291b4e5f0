"""Hostile but ordinary requests against a real server on 127.0.0.1: absurd nesting, lying or
huge lengths, chunked floods, bad bytes, clients that hang up mid-body. Each gets an OpenAI
error (or, for a client that left, one 499 log line), at once, with no traceback logged."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import pytest

from tests.test_serve_api import NAME, serve_model, start_server  # noqa: F401
from tests.test_serve_limits import assert_error

CAP = 64 << 10
CHAT = "/v1/chat/completions"
NESTED = b"[" * 10000 + b"]" * 10000


class LogLines(logging.Handler):
    """Every record the server logs: access lines and uvicorn's errors with tracebacks."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(logging.Formatter().format(record))

    def wait_for(self, text: str, timeout: float = 5.0) -> str:
        """The first line containing ``text`` (the access line follows the answer)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if text in line]
            if found:
                return found[0]
            time.sleep(0.01)
        raise AssertionError(f"no log line with {text!r} in {self.lines}")

    def assert_clean(self) -> None:
        text = "\n".join(self.lines)
        assert "Traceback" not in text and "Exception in ASGI" not in text, text


@pytest.fixture(scope="module")
def server(serve_model, tokenizer):  # noqa: F811
    live = start_server(serve_model, tokenizer, max_request_bytes=CAP)
    yield live
    live.stop()


@pytest.fixture
def server_log(server):
    handler = LogLines()
    access = logging.getLogger("slmkit.serve.access")
    level = access.level
    access.setLevel(logging.INFO)
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "slmkit.serve.access")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)
    access.setLevel(level)


def raw_request(server, data: bytes, timeout: float = 5.0) -> tuple[httpx.Response, float]:
    """Send ``data`` on a fresh socket (from a thread: the server may stop reading and
    close first), read the answer until the server closes; ``(response, seconds)``."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        def send():
            try:
                sock.sendall(data)
            except OSError:  # refused mid-body: the answer is already on its way
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:  # closed with our unread body: the answer came first
            assert received
        sender.join(timeout)
    elapsed = time.monotonic() - start
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(h.split(": ", 1)) for h in header_lines]
    return httpx.Response(int(status_line.split()[1]), headers=headers, content=body), elapsed


def post_head(length: int | None = None, path: str = CHAT) -> bytes:
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Connection: close\r\n{framing}\r\n\r\n").encode()


@pytest.mark.parametrize("body, code", [
    (NESTED, "invalid_json"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "x": '
     + NESTED + b"}", "invalid_json"),
    (b'{"model": "tiny", "messages": ' + NESTED + b"}", "invalid_json"),
    (b'{"model": "\xff\xfe", "messages": []}', "invalid_json"),
    (b"42", "invalid_json"),
    (b'"hello"', "invalid_json"),
    (b"null", "invalid_json"),
    (b'[{"role": "user", "content": "hi"}]', "invalid_json"),
])
def test_malformed_bodies_get_400(server, server_log, body, code):
    start = time.monotonic()
    r = httpx.post(server.url + CHAT, content=body, headers={"Content-Type": "application/json"})
    assert_error(r, 400, None, code)
    assert time.monotonic() - start < 2
    server_log.wait_for('"status": 400')
    server_log.assert_clean()


@pytest.mark.parametrize("length, sent", [(10 ** 12, b"{"), (10 ** 12, b""), (CAP + 1, b"")])
def test_declared_length_over_the_cap_gets_413_at_once(server, server_log, length, sent):
    r, elapsed = raw_request(server, post_head(length) + sent)
    error = assert_error(r, 413, None, "request_too_large")
    assert str(CAP) in error["message"]
    assert r.headers["connection"] == "close" and elapsed < 2
    assert "over this server's limit" in server_log.wait_for('"status": 413')
    server_log.assert_clean()


def test_chunked_body_over_the_cap_gets_413(server, server_log):
    chunk = b"x" * 8192
    frames = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * (CAP // len(chunk) * 4) + b"0\r\n\r\n"
    r, elapsed = raw_request(server, post_head() + frames)
    assert_error(r, 413, None, "request_too_large")
    assert elapsed < 2
    server_log.wait_for('"status": 413')
    # a chunked request under the cap is served as usual
    body = json.dumps({"model": NAME, "max_tokens": 2,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    r, _ = raw_request(server, post_head() + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    server_log.assert_clean()


@pytest.mark.parametrize("sent", [b"", b'{"model": "ti'])
def test_client_leaving_mid_body_is_one_log_line(server, server_log, sent):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(post_head(1000) + sent)
    line = json.loads(server_log.wait_for('"status": 499'))
    assert line["path"] == CHAT and line["duration_ms"] < 2000
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    server_log.assert_clean()


@pytest.mark.parametrize("endpoint,field,value", [
    ("chat", "functions", [{"name": "f", "parameters": {}}]),
    ("chat", "function_call", "auto"),
    ("completion", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("completion", "tool_choice", "auto"),
    ("completion", "parallel_tool_calls", False),
])
def test_fields_that_cannot_be_honoured_are_refused(endpoint, field, value):
    """Deprecated function fields, and tools outside chat: a 400 naming them, not ignored
    (tools and response_format themselves are honoured: tests/test_serve_tools.py)."""
    from slmkit.serve.protocol import APIError, ChatRequest, CompletionRequest, parse_request

    schema = ChatRequest if endpoint == "chat" else CompletionRequest
    body = {"model": "m", field: value, **(
        {"messages": [{"role": "user", "content": "hi"}]} if endpoint == "chat"
        else {"prompt": "hi"})}
    with pytest.raises(APIError) as err:
        parse_request(json.dumps(body).encode(), schema)
    assert err.value.status == 400 and err.value.param == field
    assert err.value.code == "unsupported_parameter"
    plain = {k: v for k, v in body.items() if k != field}
    plain["response_format"] = {"type": "text"}
    assert parse_request(json.dumps(plain).encode(), schema).model == "m"
