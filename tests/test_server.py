"""Chapter 9's server, driven as clients drive it: the official `openai` package, raw HTTP,
the load generator. One server (SmolLM2, a small pool) is started for the module on
127.0.0.1 and stopped at its end; the shutdown and port tests start their own."""

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from reference_engine.serve.bench import ServerProcess, free_port

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--kv-blocks", "96", "--block-size", "16", "--max-batch", "4", "--max-waiting", "4",
                        "--threads", "1"]) as s:
        yield s
        print(s.output())  # shown when a test of the module failed


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith(("dojo_", "process_")) and "{" not in line.split()[0]}


def wait_until_idle(url: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = metrics(url)
        if m["dojo_kv_blocks_used"] == 0 and m["dojo_requests_running"] == 0 and m["dojo_requests_waiting"] == 0:
            return m
        time.sleep(0.1)
    raise AssertionError(f"the server did not return to idle: {m}")


def sse_lines(response) -> list[str]:
    return [line for line in response.iter_lines() if line]


def test_openai_client_whole_and_streamed_agree(server):
    openai = pytest.importorskip("openai")  # a test dependency (pyproject's test extra)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [MODEL]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    parts, usage, finish = [], None, None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "Paris" in whole.choices[0].message.content
    assert "".join(parts) == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens <= 12
    assert usage.prompt_tokens == whole.usage.prompt_tokens and finish == whole.choices[0].finish_reason
    text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert text.choices[0].text.startswith(" Paris") and text.usage.completion_tokens == 8
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)


def test_raw_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": MODEL, "prompt": "One, two, three,", "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = sse_lines(r)
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    whole = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}).json()
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]


def test_a_stop_string_ends_the_text_before_it(server):
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3, 4,", "max_tokens": 20, "temperature": 0}
    full = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]["text"]
    assert " 7" in full, full
    cut = httpx.post(server.url + "/v1/completions", json={**body, "stop": [" 7"]}).json()["choices"][0]
    assert cut["text"] == full[: full.index(" 7")] and cut["finish_reason"] == "stop"


@pytest.mark.parametrize("body, status, needle", [
    ("{not json", 400, "not valid JSON"),
    ({"model": MODEL, "prompt": "x", "max_token": 3}, 400, "unknown field 'max_token'"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 9000}, 400, "context of 8192"),
    ({"model": MODEL, "prompt": ""}, 400, "empty"),
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "one string"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n: Input should be 1"),
    ({"model": MODEL, "prompt": "x", "seed": 2**70}, 400, "seed"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL, "prompt": "word " * 300_000}, 400, "characters"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
])
def test_bad_requests_get_openai_errors(server, body, status, needle):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and needle in error["message"]
    ok = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    assert ok.status_code == 200, "a bad request disturbed the server"


def test_a_client_that_hangs_up_frees_its_blocks_at_once(server):
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = (line for line in r.iter_lines() if line)
        for _ in range(4):
            assert next(lines) != "data: [DONE]"
        assert metrics(server.url)["dojo_kv_blocks_used"] > 0
    t0 = time.monotonic()
    m = wait_until_idle(server.url, timeout=5.0)
    assert time.monotonic() - t0 < 5.0 and m["dojo_kv_blocks_used"] == 0


def test_a_streamed_stop_string_is_never_sent(server):
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3, 4,", "max_tokens": 20, "temperature": 0, "stop": [" 7,"],
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts = [c["choices"][0]["text"] for c in chunks]
    whole = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}).json()["choices"][0]
    assert "".join(texts) == whole["text"] == " 5, 6," and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any(" 7" in t for t in texts)


def test_tiny_temperature_is_greedy_and_a_seed_repeats(server):
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6}
    greedy = httpx.post(server.url + "/v1/completions", json={**body, "temperature": 0}).json()
    tiny = httpx.post(server.url + "/v1/completions", json={**body, "temperature": 1e-40}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"], tiny
    seeded = [httpx.post(server.url + "/v1/completions", json={**body, "temperature": 1.0, "seed": 2**63 - 1}).json()
              for _ in range(2)]
    assert seeded[0]["choices"][0]["text"] == seeded[1]["choices"][0]["text"]


def test_a_non_streaming_client_that_hangs_up_is_aborted(server):
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 1000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=2.0))
    wait_until_idle(server.url, timeout=5.0)  # 1000 tokens would take a minute: it was aborted


def test_a_full_queue_answers_503_with_retry_after(server):
    body = {"model": MODEL, "prompt": "Write a poem about the sea.", "max_tokens": 40, "temperature": 0}

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            import asyncio
            return await asyncio.gather(*(client.post(server.url + "/v1/completions", json=body)
                                          for _ in range(14)))

    import asyncio

    replies = asyncio.run(burst())
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) >= 8, codes  # 4 running + 4 waiting are always taken
    refused = [r for r in replies if r.status_code == 503]
    assert refused, f"14 requests at once against 4 seats and 4 queue places were all queued: {codes}"
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded" for r in refused)
    wait_until_idle(server.url)


def test_loadtest_with_disconnects_leaves_the_pool_empty(server):
    cmd = [sys.executable, "-m", "reference_engine", "loadtest", "--url", server.url, "--concurrency", "4",
           "--requests", "12", "--disconnect", "3", "--max-tokens", "exp:8", "--json"]
    rss = []
    for _ in range(2):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout.splitlines()[-1])[0]
        assert (summary["completed"], summary["disconnected"], summary["failed"]) == (9, 3, 0), summary
        assert summary["ttft"]["p99"] >= summary["ttft"]["p50"] > 0 and summary["tokens_per_s"] > 0
        m = wait_until_idle(server.url)
        rss.append(m["process_resident_memory_bytes"])  # what /metrics reports, as the README's figure
    assert rss[1] < rss[0] * 1.05 + 20e6, f"the server's memory grew across two identical runs: {rss}"


def test_loadtest_sweeps_poisson_rates_into_a_plot(server, tmp_path):
    png = tmp_path / "load.png"
    out = subprocess.run([sys.executable, "-m", "reference_engine", "loadtest", "--url", server.url, "--rate", "2,8",
                          "--requests", "4", "--max-tokens", "exp:4", "--plot", str(png), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    points = json.loads(out.stdout.splitlines()[-1])
    assert [p["rate"] for p in points] == [2.0, 8.0] and all(p["completed"] == 4 for p in points)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, "-m", "reference_engine", "loadtest", "--url", server.url, "--rate", "2",
                          "--plot", str(png)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --plot needs several loads")


def test_metrics_are_prometheus_text(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("dojo_requests_total", "dojo_generation_tokens_total", "dojo_requests_waiting",
                 "dojo_kv_blocks_used", "dojo_time_to_first_token_seconds_bucket",
                 "dojo_time_per_output_token_seconds_count"):
        assert name in text, name
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_an_int8_kv_pool_serves_and_says_so():
    """`serve --kv-dtype int8`: the pool holds int8 codes and a scale per 32 values, 13.0 KB a
    token for SmolLM2 (8 blocks of 16 slots: 1.7 MB), and the server answers."""
    with ServerProcess(["--kv-dtype", "int8", "--kv-blocks", "8", "--threads", "1"]) as s:
        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
        reply = httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()
        assert reply["usage"]["completion_tokens"] == 6 and reply["choices"][0]["text"].strip()
        assert "KV pool 8 x 16 slots = 2 MB in int8" in s.output()


def test_sigterm_finishes_short_requests_and_cancels_long_ones():
    """Graceful shutdown: no new connections, running requests get --shutdown-timeout seconds,
    then what still runs is cancelled; the process ends as SIGTERM asks (status -15)."""
    from concurrent.futures import ThreadPoolExecutor

    def stream(url, max_tokens, started):
        body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": max_tokens, "temperature": 0,
                "stream": True}
        lines = []
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()
        except httpx.HTTPError as e:  # the cut-off stream may end as a broken transfer
            lines.append(type(e).__name__)
        return lines

    import threading

    with ServerProcess(["--threads", "1", "--shutdown-timeout", "4"]) as s:
        a_started, b_started = threading.Event(), threading.Event()
        with ThreadPoolExecutor(2) as pool:
            short = pool.submit(stream, s.url, 6, a_started)
            long = pool.submit(stream, s.url, 1000, b_started)
            assert a_started.wait(30) and b_started.wait(30)
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            short, long = short.result(), long.result()
            code = s.proc.wait(30)
        assert short[-1] == "data: [DONE]", "a short request was cut off by a graceful shutdown"
        assert long[-1] != "data: [DONE]" and len(long) < 1000, "a long request outlived the shutdown timeout"
        assert code == -signal.SIGTERM and time.monotonic() - t0 < 15, (code, s.output())


def test_a_port_in_use_is_one_error_line():
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "reference_engine", "serve", "--port", str(port)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in out.stderr and time.monotonic() - t0 < 30
