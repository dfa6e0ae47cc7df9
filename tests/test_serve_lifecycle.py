"""`krakenlm serve` at its edges (issues 26 and 28), live on loopback with the openai client, httpx and raw
sockets: bodies it must refuse, slow and vanishing clients, 429s in /metrics, the default model id, a drain
that runs out of time, start-up refusals, and SIGTERM with a stopped follower rank."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from krakenlm.cli import main
from krakenlm.serve.process import ServerProcess
from tests.test_serve_http import KRAKEN, LONG, MODEL, counter, live_server, openai_client, port_is_free, wait_for

ENDLESS = {"prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0, "stream": True, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = live_server(tmp_path_factory.mktemp("edge"), LONG, "--max-batch", "1", "--max-queue", "1",
                         "--read-timeout", "2")
    yield server
    assert server.stop() == 0


@pytest.mark.parametrize("body,message", [
    (b'{"prompt": "a", "stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper than 64 levels"),
    (b'{"prompt": "a", "n": 1.0}', "n=1"), (b'{"prompt": "a", "stop": "\\ud800"}', "not valid Unicode"),
    (b'{"prompt": "\\udfff abc"}', "not valid Unicode"), (b'{"prompt": "a", "user": 5}', "user"),
])
def test_bodies_the_server_must_refuse_are_400(server, body, message):
    reply = httpx.post(f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"},
                       timeout=60)
    assert reply.status_code == 400 and message in reply.json()["error"]["message"], reply.text


def test_the_openai_client_gets_400_for_them_too(server):
    client = openai_client(server)
    for bad in ({"n": 1.0}, {"user": 5}):  # (it cannot even send a lone surrogate: raw bodies above)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="a", max_tokens=1, **bad)
    assert client.completions.create(model=MODEL, prompt="a", max_tokens=1, user="me", n=1).choices


def test_429s_are_counted_in_metrics(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        before = counter(http.get("/metrics").text, "queue_full")
        with http.stream("POST", "/v1/completions", json=ENDLESS) as first:
            lines = first.iter_lines()  # (dropping the iterator would close the connection)
            next(line for line in lines if line.startswith("data: "))  # it holds the only row
            waiter = threading.Thread(target=lambda: httpx.post(f"{server.url}/v1/completions", timeout=60,
                                                                json=ENDLESS | {"stream": False, "max_tokens": 2}))
            waiter.start()
            wait_for(server.url, {}, lambda h: h["waiting"] == 1)
            assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 429
        waiter.join(120)
        assert counter(http.get("/metrics").text, "queue_full") == before + 1


def raw(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=20)


def test_slow_clients_are_cut_off_after_the_read_timeout(server):
    with raw(server) as silent:  # headers never finish: the connection is closed
        silent.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        assert silent.recv(1024) == b""  # closed (the 20 s socket timeout is the hang guard)
    with raw(server) as slow:  # headers, then a body that never finishes: 408 with a JSON error
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\":")
        reply = b""
        while b"}}" not in reply and (chunk := slow.recv(4096)):
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and "did not arrive" in json.loads(body)["error"]["message"]


def test_clients_that_vanish_mid_body_leave_no_traceback(server):
    for _ in range(5):
        with raw(server) as gone:
            gone.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"pro")
    assert openai_client(server).completions.create(model=MODEL, prompt="a", max_tokens=1).choices
    time.sleep(0.5)
    log = "".join(server.stderr)
    assert "Traceback" not in log and "ClientDisconnect" not in log, log[-3000:]


def test_a_preset_is_served_under_its_own_name():
    with ServerProcess(["--preset", "mini-gpt", "--device", "cpu", "--dtype", "fp32", "--max-batch", "1"],
                       timeout=180) as preset:
        client = openai_client(preset)
        assert [m.id for m in client.models.list()] == ["mini-gpt"]
        assert client.completions.create(model="mini-gpt", prompt="Hi", max_tokens=2).choices


@pytest.mark.parametrize("args,message", [(["--host", ""], "host"), (["--max-tokens", "0"], "max_tokens"),
                                          (["--read-timeout", "0"], "read_timeout")])
def test_serve_refuses_to_start(args, message, capsys):
    assert main(["serve", "--preset", "mini-gpt", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_a_drain_that_runs_out_of_time_ends_requests_with_a_readable_error(tmp_path):
    server = live_server(tmp_path, LONG, "--max-batch", "1", "--drain-timeout", "1")
    streamed: list[str] = []
    whole: list[httpx.Response] = []
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http, \
                http.stream("POST", "/v1/completions", json=ENDLESS) as reply:
            lines = reply.iter_lines()
            streamed.append(next(line for line in lines if line.startswith("data: ")))
            waiting = threading.Thread(target=lambda: whole.append(httpx.post(
                f"{server.url}/v1/completions", json=ENDLESS | {"stream": False}, timeout=60)))
            waiting.start()
            wait_for(server.url, {}, lambda h: h["waiting"] == 1)
            server.proc.send_signal(signal.SIGTERM)
            streamed += [line for line in lines if line.startswith("data: ")]
        waiting.join(60)
        assert server.proc.wait(60) == 0
    finally:
        server.stop()
    assert streamed[-1] == "data: [DONE]" and len(streamed) < 2000
    error = json.loads(streamed[-2][6:])["error"]
    assert "drain timeout of 1s ran out" in error["message"]
    assert whole[0].status_code == 503 and "drain timeout" in whole[0].json()["error"]["message"]


def test_sigterm_with_a_stopped_follower_ends_the_server_and_the_rank(tmp_path):
    server = live_server(tmp_path, KRAKEN, "--tp", "2", "--timeout", "5", "--dtype", "fp32")  # no probe within 5 s
    (follower,) = server.children()
    try:
        os.kill(follower, signal.SIGSTOP)
        with httpx.Client(base_url=server.url, timeout=120) as http:
            reply = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 4})
            assert reply.status_code == 503 and "engine is down" in reply.json()["error"]["message"]
            health = http.get("/health").json()
            assert health["status"] == "unhealthy" and health["running"] == health["waiting"] == 0
        assert server.stop(timeout=60) == 0  # hang guard: both were still running 300 s after SIGTERM
        deadline = time.monotonic() + 20
        while alive(follower):
            assert time.monotonic() < deadline, "the stopped follower outlived the server"
            time.sleep(0.1)
        assert port_is_free(server.port)
    finally:
        if alive(follower):
            os.kill(follower, signal.SIGKILL)
        server.kill()


def alive(pid: int) -> bool:
    """Running or stopped (not gone, not a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def test_accepted_connections_send_without_nagle_delays():
    """The listener's connections have TCP_NODELAY: with Nagle on, a response written in two pieces (headers,
    body; or one SSE chunk after another) waited for the client's delayed ACK, ~40 ms each on Linux."""
    import asyncio

    from krakenlm.serve.server import bind

    async def accepted_nodelay() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        listener = bind("127.0.0.1", 0)
        async with await asyncio.start_server(handle, sock=listener):
            _, writer = await asyncio.open_connection(*listener.getsockname())
            value = await asyncio.wait_for(seen, 10)
            writer.close()
            return value

    assert asyncio.run(accepted_nodelay()) != 0
