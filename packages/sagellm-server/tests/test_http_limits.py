"""Slow, hung-up and numerous clients against a real server process over raw sockets; and the
event loop stays free (/health answers) while a hostile template or a huge prompt is processed."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_harness import API_KEY, MODEL_NAME, Server, start_server, stop_server

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
MAX_CONNECTIONS = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("limits"), "--header-timeout", str(HEADER_TIMEOUT),
                       "--body-timeout", str(BODY_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS),
                       "--max-request-body-bytes", str(8 << 20))
    try:
        yield srv
    finally:
        stop_server(srv)


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def read_until_closed(s: socket.socket, timeout: float = 30) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    t0 = time.monotonic()
    s.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - t0


def wait_for_log(server: Server, text: str, count: int, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.log_text()
        if log.count(text) >= count:
            return log
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not logged {count} times:\n{server.log_text()[-3000:]}")


def head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


def test_half_a_header_is_closed_after_the_header_timeout(server: Server) -> None:
    with connect(server) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        data, took = read_until_closed(s)
    assert data.startswith(b"HTTP/1.1 408"), data
    assert HEADER_TIMEOUT * 0.8 <= took < HEADER_TIMEOUT + 15


def test_dripped_header_bytes_do_not_reset_the_timeout(server: Server) -> None:
    """Slowloris: one byte at a time keeps a naive idle timer alive forever."""
    closed = threading.Event()
    with connect(server) as s:
        t0 = time.monotonic()

        def drip() -> None:
            for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
                if closed.is_set():
                    return
                try:
                    s.send(bytes([b]))
                except OSError:
                    return
                time.sleep(0.2)

        t = threading.Thread(target=drip, daemon=True)
        t.start()
        data, _ = read_until_closed(s)
        took = time.monotonic() - t0
        closed.set()
    assert data.startswith(b"HTTP/1.1 408") and took < HEADER_TIMEOUT + 15, (data, took)


def test_a_silent_connection_is_closed(server: Server) -> None:
    with connect(server) as s:
        data, took = read_until_closed(s)
    assert data == b"" and took < HEADER_TIMEOUT + 15


def test_a_slow_body_gets_408(server: Server) -> None:
    with connect(server) as s:
        s.sendall(head("/v1/completions", 100) + b'{"prompt": ')
        data, took = read_until_closed(s)
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b"request_timeout" in data and took < BODY_TIMEOUT + 15


def test_a_hang_up_mid_body_logs_one_line_and_no_traceback(server: Server) -> None:
    before = server.log_text().count("hung up while sending a request body")
    for _ in range(3):
        with connect(server) as s:
            s.sendall(head("/v1/completions", 1000) + b'{"prompt": "abc')
            time.sleep(0.3)
    log = wait_for_log(server, "hung up while sending a request body", before + 3)
    assert "Traceback" not in log and "ClientDisconnect" not in log
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_hang_ups_while_waiting_or_streaming_log_one_line(server: Server) -> None:
    body = {"model": MODEL_NAME, "prompt": "Write an essay.", "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=1.5)
    wait_for_log(server, "hung up waiting for /v1/completions", 1)
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True},
                      headers=server.headers, timeout=60) as r:
        next(ln for ln in r.iter_lines() if ln.startswith("data: {"))
    log = wait_for_log(server, "hung up during a stream", 1)
    assert "Traceback" not in log


def test_connections_beyond_the_cap_get_503(server: Server) -> None:
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # let the server accept them all
        with connect(server) as extra:
            data, _ = read_until_closed(extra, timeout=10)
        assert data.startswith(b"HTTP/1.1 503") and b"too_many_connections" in data, data
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 20  # the cap frees up as connections close
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        raise AssertionError("the server did not accept connections again")


def health_during(server: Server, work: Any) -> tuple[Any, list[float]]:
    """Run ``work()`` in a thread; meanwhile, time /health answers (each must be within 3 s)."""
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(work()), daemon=True)
    t.start()
    latencies: list[float] = []
    with httpx.Client(timeout=3) as h:
        while t.is_alive():
            t0 = time.monotonic()
            assert h.get(f"{server.url}/health").status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.1)
    t.join()
    return result[0], latencies


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set s = 'x' * 200000000 %}{{ s }}",
    "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
], ids=["nested loops", "string repetition", "exponential macros"])
def test_hostile_chat_template_is_a_400_and_health_stays_up(server: Server, template: str) -> None:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "chat_template": template}
    r, latencies = health_during(server, lambda: httpx.post(f"{server.url}/v1/chat/completions", json=body,
                                                              headers=server.headers, timeout=60))
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template", r.text


def test_megabytes_of_prompt_do_not_block_health(server: Server) -> None:
    body = {"model": MODEL_NAME, "prompt": "hello world, this is a test. " * 250_000}  # 7 MB
    r, latencies = health_during(server, lambda: httpx.post(f"{server.url}/v1/completions", json=body,
                                                              headers=server.headers, timeout=120))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert latencies  # /health was asked while the prompt was tokenized


def test_lone_surrogate_with_the_real_tokenizer_is_a_400(server: Server) -> None:
    for path, raw in [("/v1/completions", b'{"prompt": "\\ud800"}'),
                      ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}')]:
        r = httpx.post(f"{server.url}{path}", content=raw, timeout=30,
                       headers={**server.headers, "Content-Type": "application/json"})
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text


def test_request_chat_template_still_works(server: Server) -> None:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3,
            "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                             "{% endfor %}<|im_start|>assistant\n"}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None, r.text
