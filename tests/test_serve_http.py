"""`krakenlm serve` live on loopback, driven by the official openai client and raw HTTP: the same text as
Engine.generate (streamed and whole), batching that changes no result on 1 and 2 ranks, every bad input
refused while another request completes, limits (401, 413, 429), cancellation, a killed rank, SIGTERM."""

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from krakenlm.engine import Engine, EngineOptions
from krakenlm.generate import Stop
from krakenlm.serve.process import ServerProcess
from krakenlm.source import ModelSource
from krakenlm.tokenizer import get_tokenizer
from tests.conftest import tiny

GPT = tiny("gpt", vocab_size=50257)  # GPT-2 BPE: random tokens decode to distinctive text
KRAKEN = tiny("kraken", vocab_size=50257)
LONG = tiny("gpt", vocab_size=50257, block_size=2048)  # room for requests that outlast the test's checks
MODEL = "tiny"
TEXTS = ["The quick brown fox", "Hello, world", "Once upon a time", "def main():", "In 1969, the first",
         "Paris is", "Numbers: 1, 2, 3,", "A B C"]


def live_server(tmp: Path, cfg, *args: str) -> ServerProcess:
    """`krakenlm serve` of a tiny config on a free port, as a child process."""
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return ServerProcess(["--config", str(path), "--device", "cpu", "--model-name", MODEL, *args], timeout=120)


def openai_client(server: ServerProcess, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def reference(cfg, texts: list[str], max_tokens: int) -> list[str]:
    """What Engine.generate makes of each prompt alone (the independent computation)."""
    tok = get_tokenizer("gpt2")
    engine = Engine(ModelSource(config=cfg), EngineOptions(device="cpu"))
    return [tok.decode(engine.generate([tok.encode(t)], max_tokens, stop=Stop((tok.eot_token,)),
                                       vocab_limit=tok.vocab_size).tokens[0]) for t in texts]


@pytest.fixture(scope="module")
def gpt_server(tmp_path_factory):
    server = live_server(tmp_path_factory.mktemp("gpt"), GPT, "--max-batch", "8")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def kraken_tp2_server(tmp_path_factory):
    # prompts prefilled 3 tokens a step in all: the server's chunked and batched prefill on 2 ranks
    server = live_server(tmp_path_factory.mktemp("kraken"), KRAKEN, "--tp", "2", "--max-batch", "8", "--timeout", "10",
                         "--prefill-chunk", "3")
    yield server
    server.stop()


def concurrent(client: openai.OpenAI, texts: list[str], max_tokens: int, stream: bool) -> list[str]:
    """All prompts at once (one thread each), greedy; the texts in prompt order."""
    def one(i: int) -> None:
        reply = client.completions.create(model=MODEL, prompt=texts[i], max_tokens=max_tokens, temperature=0,
                                          stream=stream)
        results[i] = "".join(c.choices[0].text for c in reply) if stream else reply.choices[0].text

    results = [""] * len(texts)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_openai_client_gets_generate_text_alone_and_batched_on_one_rank(gpt_server):
    want = reference(GPT, TEXTS, 24)
    client = openai_client(gpt_server)
    whole = client.completions.create(model=MODEL, prompt=TEXTS[0], max_tokens=24, temperature=0)
    assert whole.choices[0].text == want[0] and whole.usage.prompt_tokens == len(get_tokenizer().encode(TEXTS[0]))
    streamed = client.completions.create(model=MODEL, prompt=TEXTS[1], max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want[1]
    assert concurrent(client, TEXTS, 24, stream=True) == want  # 8 at once: batching changes no result
    assert concurrent(client, TEXTS, 24, stream=False) == want


def test_token_ids_stop_strings_and_seeded_sampling(gpt_server):
    client = openai_client(gpt_server)
    ids = get_tokenizer().encode(TEXTS[2])
    full = client.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0).choices[0].text
    assert full == reference(GPT, [TEXTS[2]], 16)[0]
    stop = full[5:8]
    cut = client.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    sampled = [client.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=1.0, seed=11,
                                         extra_body={"top_k": 50}).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0] != full  # seeded: repeatable, and really sampled


BAD = [
    (b"{not json", 400, "not valid JSON"), (b'{"prompt": "a", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": 100000}', 400, "context"),
    (b'{"prompt": "a", "frobnicate": 1}', 400, "frobnicate"),
    (b'{"prompt": "' + b"word " * 200 + b'"}', 400, "context"), (b'{"prompt": "\xff\xfe"}', 400, "UTF-8"),
    (b'{"prompt": "a", "echo": true}', 400, "echo"), (b'{"prompt": "a", "n": 3}', 400, "n=1"),
    (b'{"prompt": [99999999]}', 400, "outside the vocabulary"), (b'{"prompt": "a", "model": "other"}', 404, "other"),
    (b'{"prompt": "a", "max_tokens": "many"}', 400, "max_tokens"), (b"42", 400, "JSON object"),
    (b'{"prompt": "a", "repetition_penalty": 1.2}', 400, "repetition_penalty"),  # only vllm bench's no-op 1.0
]


def test_bad_inputs_get_their_status_while_another_request_completes(gpt_server):
    want = reference(GPT, [TEXTS[3]], 100)[0]
    body = {"prompt": TEXTS[3], "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.Client(base_url=gpt_server.url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=body) as inflight:
        lines = inflight.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        for raw, status, message in BAD:
            reply = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert reply.status_code == status, (raw[:40], reply.text)
            error = reply.json()["error"]
            assert message in error["message"] and error["type"], (raw[:40], error)
        assert http.get("/v1/nothing").status_code == 404
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_health_models_and_metrics(gpt_server):
    openai_client(gpt_server).completions.create(model=MODEL, prompt="x", max_tokens=2)  # finishes by length
    with httpx.Client(base_url=gpt_server.url, timeout=30) as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["ranks"] == 1
        assert health.json()["max_batch"] == 8
        card = http.get("/v1/models").json()["data"][0]
        assert card["id"] == MODEL and card["max_model_len"] == GPT.block_size and card["vocab_size"] == 50257
        metrics = http.get("/metrics").text
    for name in ("krakenlm_time_to_first_token_seconds_bucket", "krakenlm_time_per_output_token_seconds_count",
                 "krakenlm_e2e_request_latency_seconds_sum", "krakenlm_queue_depth", "krakenlm_running_requests",
                 "krakenlm_generation_tokens_per_second", "krakenlm_generation_tokens_total"):
        assert name in metrics
    assert counter(metrics, "length") >= 1


def test_two_ranks_kraken_batched_equals_alone(kraken_tp2_server):
    want = reference(KRAKEN, TEXTS, 20)
    assert concurrent(openai_client(kraken_tp2_server), TEXTS, 20, stream=True) == want
    assert len(kraken_tp2_server.children()) == 1


def counter(metrics: str, outcome: str) -> float:
    found = re.search(rf'krakenlm_requests_total\{{outcome="{outcome}"\}} (\S+)', metrics)
    return float(found.group(1)) if found else 0.0


def stream_text(url: str, body: dict, headers: dict, out: list) -> None:
    """A whole streamed completion's data lines, appended to ``out`` (run in a thread)."""
    with httpx.Client(base_url=url, timeout=60, headers=headers) as http, \
            http.stream("POST", "/v1/completions", json=body) as reply:
        out.extend(line for line in reply.iter_lines() if line.startswith("data: "))


def wait_for(url: str, headers: dict, what, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/health", headers=headers, timeout=10).json()
        if what(health):
            return health
        time.sleep(0.05)
    raise AssertionError(f"server never reached the state; last /health: {health}")


def test_limits_cancellation_and_sigterm_drain(tmp_path):
    server = live_server(tmp_path, LONG, "--max-batch", "1", "--max-queue", "1", "--api-key", "sesame",
                        "--max-body-bytes", "4000")
    auth = {"Authorization": "Bearer sesame"}
    long = {"prompt": TEXTS[0], "max_tokens": 2000, "temperature": 0, "stream": True, "ignore_eos": True}
    try:
        for key in ("none", "wrong"):
            with pytest.raises(openai.AuthenticationError):
                openai_client(server, key).completions.create(model=MODEL, prompt="a", max_tokens=1)
        assert openai_client(server, "sesame").completions.create(model=MODEL, prompt="a", max_tokens=2).choices
        with httpx.Client(base_url=server.url, timeout=60, headers=auth) as http:
            big = http.post("/v1/completions", json={"prompt": "x" * 5000})
            assert big.status_code == 413 and "limit of 4000 bytes" in big.json()["error"]["message"]
            second: list[str] = []
            with http.stream("POST", "/v1/completions", json=long) as first:
                lines = first.iter_lines()  # (dropping the iterator would close the connection)
                next(line for line in lines if line.startswith("data: "))  # it holds the only row
                waiter = threading.Thread(target=stream_text, args=(server.url, long, auth, second))
                waiter.start()
                wait_for(server.url, auth, lambda h: h["waiting"] == 1)
                busy = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
                assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
            # the first client left after one token: its row goes to the waiting request
            waiter.join(120)
            assert second[-1] == "data: [DONE]" and len(second) == 2001
            assert counter(http.get("/metrics").text, "cancelled") == 1
            with http.stream("POST", "/v1/completions", json=long) as draining:
                lines = draining.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                server.proc.send_signal(signal.SIGTERM)  # drains: the in-flight stream still completes
                rest = [line for line in lines if line.startswith("data: ")]
            assert rest[-1] == "data: [DONE]" and len(rest) == 2000  # the other 1999 tokens, then [DONE]
        assert server.proc.wait(60) == 0
        assert port_is_free(server.port)
    finally:
        server.stop()


def test_killed_follower_gives_503_not_a_hang_and_shutdown_leaves_nothing(kraken_tp2_server):
    server = kraken_tp2_server
    (follower,) = server.children()
    body = {"prompt": TEXTS[0], "max_tokens": 100, "temperature": 0, "stream": True, "ignore_eos": True}
    start = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as reply:
            lines = reply.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            os.kill(follower, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        error = json.loads(rest[-2][6:]) if rest[-1] == "data: [DONE]" else json.loads(rest[-1][6:])
        assert "engine is down" in error["error"]["message"]
        after = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert after.status_code == 503 and "engine is down" in after.json()["error"]["message"]
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
    assert time.monotonic() - start < 10 + 15  # within the collective timeout (10 s) and some slack
    assert server.stop() == 0
    assert port_is_free(server.port)
    assert not Path(f"/proc/{follower}").exists()


def test_loadtest_reports_and_compares(gpt_server, tmp_path, capsys):
    from krakenlm.cli import main

    out, png = tmp_path / "load.json", tmp_path / "load.png"
    argv = ["loadtest", "--compare", f"a={gpt_server.url},b={gpt_server.url}", "--rate", "40,inf", "--requests", "6",
            "--prompt-len", "8", "--output-len", "5", "--slo", '{"ttft_s": 60}', "--out", str(out), "--plot", str(png)]
    assert main(argv) == 0
    reports = json.loads(out.read_text())["reports"]
    assert [(r["server"], r["offered_rate"]) for r in reports] == [("a", 40.0), ("b", 40.0), ("a", "inf"), ("b", "inf")]
    for r in reports:
        assert r["completed"] == 6 and r["failed"] == 0 and not r["errors"]
        assert r["output_tokens_per_s"] == pytest.approx(5 * r["throughput_rps"])  # exactly output_len each
        assert r["goodput_rps"] == r["throughput_rps"]  # a 60 s TTFT SLO: every request meets it
        assert 0 < r["ttft_s"]["p50"] <= r["e2e_s"]["p50"] and r["tpot_s"]["p99"] > 0 and r["itl_s"]["p50"] > 0
    table = capsys.readouterr().out
    assert "| rate (req/s) | metric | a | b |" in table and "TTFT p99 (ms)" in table
    assert png.stat().st_size > 0


def test_a_profile_measured_on_the_server_feeds_the_simulator(gpt_server, tmp_path, capsys):
    """loadtest --profile: TTFT alone at the low / middle / high prompt, ITL at every engine width (from the
    server's max_batch 8); simulate --profile fits the host overhead to it."""
    from krakenlm.batching.profile import load_profile
    from krakenlm.cli import main

    out = tmp_path / "profile.json"
    assert main(["loadtest", "--url", gpt_server.url, "--profile", "--profile-reps", "1", "--prompt-len", "8-16",
                 "--output-len", "4", "--out", str(out)]) == 0
    profile = load_profile(str(out))
    assert profile.prompts == (8, 12, 16) and profile.widths == (1, 2, 4, 8) and profile.output == 4
    assert all(t > 0 for t in profile.ttft_alone_s + profile.itl_s)
    assert "capacity" in capsys.readouterr().out
    config = tmp_path / "config.json"
    config.write_text(json.dumps(GPT.to_dict()))
    assert main(["simulate", "--config", str(config), "--hardware", "cpu-gloo", "--rate", "5", "--requests", "4",
                 "--profile", str(out)]) == 0
    assert "host overhead fitted to" in capsys.readouterr().err


def test_loadtest_and_simulate_run_the_same_load(gpt_server, tmp_path, capsys):
    """The same workload arguments and seed: the server gets, and the simulator models, the same requests
    (krakenlm.batching.workload), so their reports count the same requests and output tokens."""
    from krakenlm.batching.workload import Lengths, LoadSpec
    from krakenlm.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(GPT.to_dict()))
    load = ["--rate", "30", "--requests", "7", "--prompt-len", "3-20", "--output-len", "2-6", "--seed", "4"]
    assert main(["loadtest", "--url", gpt_server.url, *load, "--out", str(tmp_path / "load.json")]) == 0
    measured = json.loads((tmp_path / "load.json").read_text())["reports"][0]
    assert main(["simulate", "--config", str(config), "--hardware", "cpu-gloo", *load,
                 "--out", str(tmp_path / "sim.json")]) == 0
    simulated = json.loads((tmp_path / "sim.json").read_text())
    capsys.readouterr()
    expected = LoadSpec(30.0, 7, Lengths(3, 20), Lengths(2, 6), seed=4).generate()
    assert len({a.output_len for a in expected}) > 1  # the lengths do vary
    for report in (measured, simulated):
        assert report["completed"] == report["requests"] == 7 and report["rate"] == 30.0
        tokens = report["output_tokens_per_s"] * report["duration_s"]
        assert tokens == pytest.approx(sum(a.output_len for a in expected))
    assert (measured["prompt_len"], measured["output_len"], measured["seed"]) == ("3-20", "2-6", 4)
