"""Connection-level limits and shutdown, on loopback: header size, slow clients (headers or body never finished),
idle keep-alive, concurrent connections, and SIGTERM draining a real `llmos serve`."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
from urllib.parse import urlparse

import httpx
import pytest

from bench.tiny_model import build_tiny_llama
from llmos_cli.core.serve.engine import Engine
from tests.conftest import wait_until
from tests.test_server import KEY, free_port, runner, serve_in_thread  # noqa: F401 - runner is a fixture

AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def url(runner):  # noqa: F811
    limits = {"request_timeout_s": 1, "keep_alive_s": 0.5, "max_header_bytes": 2048, "max_connections": 4}
    with serve_in_thread(Engine(runner, max_batch_size=2, max_queue=4), **limits) as base:
        yield base


def raw(url: str) -> socket.socket:
    parsed = urlparse(url)
    s = socket.create_connection((parsed.hostname, parsed.port), timeout=30)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the socket timeout)."""
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def served(url: str) -> bool:
    return httpx.post(url + "/v1/completions", json=BODY, headers=AUTH, timeout=30).status_code == 200


def test_a_body_that_never_finishes_is_timed_out_and_others_are_served(url):
    with raw(url) as slow:
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        slow.sendall(head.encode() + b'{"prompt": ')
        assert served(url)  # while the slow client holds its request open
        reply = read_all(slow)
    assert reply.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in reply


def test_headers_that_never_finish_are_timed_out(url):
    with raw(url) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        assert served(url)
        assert read_all(slow) == b""  # closed by the server, without a response


def test_over_long_headers_are_refused(url):
    r = httpx.get(url + "/v1/models", headers={**AUTH, "X-Filler": "x" * 4096}, timeout=30)
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    with raw(url) as slow:  # headers arriving in pieces are capped while they arrive
        slow.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"X-Filler: " + b"x" * 4096)
        assert read_all(slow).startswith(b"HTTP/1.1 4")
    assert served(url)


def test_idle_keep_alive_connections_are_closed(url):
    with raw(url) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = read_all(conn)  # the response, then the server closes the idle connection
    assert reply.startswith(b"HTTP/1.1 200 ") and b'"ok"' in reply


def test_connections_over_the_cap_get_503(url):
    held = [raw(url) for _ in range(4)]  # connected, sending nothing
    try:
        wait_until(
            lambda: httpx.get(url + "/health", timeout=30).status_code == 503,
            alive=lambda: True,
            what="the connection cap was not applied",
            timeout=30,
        )
    finally:
        for s in held:
            s.close()
    wait_until(lambda: served(url), alive=lambda: True, what="not served after the cap", timeout=30)


# ---- graceful shutdown of a real `llmos serve`


def start_server(tmp_path, port: int) -> tuple[subprocess.Popen, dict[str, float]]:
    """`llmos serve` on a tiny model at 127.0.0.1:port; returns it and a logit_bias that rules out EOS."""
    from transformers import AutoTokenizer

    model = build_tiny_llama(tmp_path / "model")
    no_eos = {str(AutoTokenizer.from_pretrained(model).eos_token_id): -100.0}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LLMOS_API_KEY", None)
    cmd = [
        sys.executable,
        "-m",
        "llmos_cli",
        "serve",
        str(model),
        "--port",
        str(port),
        "--max-batch-size",
        "2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(base + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, alive=lambda: proc.poll() is None, what="llmos serve did not start", timeout=120)
    return proc, no_eos


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return False
    except OSError:
        return True


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path):
    port = free_port()
    proc, no_eos = start_server(tmp_path, port)
    try:
        body = {
            "prompt": "the quick",
            "max_tokens": 120,
            "temperature": 0,
            "stream": True,
            "logit_bias": no_eos,
        }
        lines, refused_while_streaming = [], False
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                if not lines:
                    proc.send_signal(signal.SIGTERM)
                    wait_until(lambda: refused(port), alive=lambda: True, what="still accepting", timeout=30)
                    refused_while_streaming = True
                lines.append(line)
        assert refused_while_streaming
        assert (
            lines[-1] == "data: [DONE]"
            and json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        )
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()


@pytest.mark.slow
def test_a_second_signal_exits_at_once(tmp_path):
    port = free_port()
    proc, no_eos = start_server(tmp_path, port)
    try:
        body = {
            "prompt": "the quick",
            "max_tokens": 480,
            "temperature": 0,
            "stream": True,
            "logit_bias": no_eos,
        }
        lines = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120) as r:
            try:
                for line in r.iter_lines():
                    if line and not lines:
                        proc.send_signal(signal.SIGTERM)
                        wait_until(
                            lambda: refused(port), alive=lambda: True, what="still accepting", timeout=30
                        )
                        proc.send_signal(signal.SIGINT)
                    lines.append(line)
            except httpx.TransportError:
                pass  # the server went away mid-stream: that is the point
        assert proc.wait(timeout=120) == 0
        assert not any('"finish_reason": "length"' in line for line in lines)  # cut short, not drained
    finally:
        proc.kill()
