"""`tunelab serve` through the official openai client (and raw HTTP where a client would not send such a
request): answers equal `tunelab generate`'s, streaming, adapters by name, errors in OpenAI's shape,
the queue bound, disconnects, and a short load test."""

import json
import threading
import time
from dataclasses import replace

import pytest

from tests.engines.test_engine_contract import random_adapter
from tunelab import adapters, engines
from tunelab.config import ServeOptions
from tunelab.data.templates import end_of_turn_ids
from tunelab.generate import prompt_ids

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from tunelab.serve import app as serve_app          # noqa: E402  (needs fastapi)
from tunelab.serve import requests as parse         # noqa: E402

MESSAGES = [{"role": "system", "content": "CREATE TABLE t (a INTEGER)"},
            {"role": "user", "content": "What is a when b is x?"}]


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama, tmp_path_factory):
    """An adapter that changes the model's answers (B random)."""
    engine = engines.get("torch", log=lambda *_: None)
    model = engine.load(tiny_llama, device="cpu", dtype="float32", log=lambda *_: None)
    spec = adapters.spec_for(-1, 2, 4, 20.0, 0.0)
    engine.attach_lora(model, spec)
    folder = tmp_path_factory.mktemp("serve") / "sql"
    adapters.save(folder, spec, random_adapter(spec, engine.adapter_tensors(model), seed=3))
    return folder


def start(opts, log):
    worker = serve_app.start_worker(opts, parse.adapter_options(opts), log)
    app = serve_app.create_app(worker, opts, log)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, worker, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(tiny_llama, adapter_dir):
    logs = []
    opts = ServeOptions(model=str(tiny_llama), adapter=[f"sql={adapter_dir}"], engine="torch", dtype="float32",
                        max_tokens=16, max_queue=32)
    server, thread, worker, url = start(opts, logs.append)
    yield url, worker, logs
    server.should_exit = True
    thread.join(timeout=10)
    worker.stop()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def generated(model_dir, messages=None, prompt=None, adapter=None, max_tokens=16):
    """What `tunelab generate` answers: the same prompt building, the engine's generate, decoded."""
    engine, model, _ = engines.load(str(model_dir), adapter, "cpu", "float32", log=lambda *_: None, engine="torch")
    tokenizer = model.tokenizer
    if messages is not None:
        ids = prompt_ids(tokenizer, messages[-1]["content"], messages[0]["content"])
        stops = end_of_turn_ids(tokenizer)
    else:
        ids, stops = prompt_ids(tokenizer, prompt, raw=True), {tokenizer.eos_token_id}
    return tokenizer.decode(list(engine.generate(model, ids, max_tokens=max_tokens, stop_ids=stops)),
                            skip_special_tokens=True)


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [served[1].base, "sql"]
    import httpx

    assert httpx.get(served[0] + "/health").json()["status"] == "ok"


def test_chat_answers_equal_generate_and_adapters_switch_by_name(tiny_llama, adapter_dir, served, client):
    base = served[1].base
    expected = {base: generated(tiny_llama, MESSAGES), "sql": generated(tiny_llama, MESSAGES, adapter=adapter_dir)}
    assert expected[base] != expected["sql"]
    for name in (base, "sql", base, "sql"):     # the adapter swapped on and off the one loaded base
        reply = client.chat.completions.create(model=name, messages=MESSAGES, temperature=0, max_tokens=16)
        assert reply.choices[0].message.content == expected[name], name
        assert reply.choices[0].finish_reason in ("stop", "length")
        usage = reply.usage
        assert usage.completion_tokens <= 16 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_sends_the_same_answer_in_chunks_with_usage(tiny_llama, served, client):
    whole = client.chat.completions.create(model="sql", messages=MESSAGES, temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model="sql", messages=MESSAGES, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_equal_generate_on_raw_text(tiny_llama, served, client):
    expected = generated(tiny_llama, prompt="SELECT a FROM")
    reply = client.completions.create(model=served[1].base, prompt="SELECT a FROM", temperature=0, max_tokens=16)
    assert reply.choices[0].text == expected
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=served[1].base, prompt="SELECT a FROM", temperature=0, max_tokens=16, stream=True) if c.choices)
    assert streamed == expected


def test_logprobs_stop_strings_and_seeds(served, client):
    reply = client.chat.completions.create(model="sql", messages=MESSAGES, temperature=0, max_tokens=8,
                                           logprobs=True, top_logprobs=2)
    entries = reply.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)
    text = reply.choices[0].message.content
    cut = text[len(text) // 2:len(text) // 2 + 2]
    stopped = client.chat.completions.create(model="sql", messages=MESSAGES, temperature=0, max_tokens=8, stop=[cut])
    assert stopped.choices[0].message.content == text[:text.find(cut)]
    assert stopped.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model="sql", messages=MESSAGES, temperature=1.0, seed=seed,
                                              max_tokens=8).choices[0].message.content for seed in (5, 5, 6)]
    assert sampled[0] == sampled[1]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, client):
    import httpx

    url = served[0] + "/v1/chat/completions"
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    cases = [
        ({"model": "sql", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": "sql", "messages": []}, "messages"),
        ({"model": "sql", "messages": MESSAGES, "n": 2}, "n"),
        ({"model": "sql", "messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ({"model": "sql", "messages": MESSAGES, "response_format": {"type": "json_schema"}}, "response_format"),
        ({"model": "sql", "messages": [{"role": "user", "content": "x " * 600}]}, "messages"),
    ]
    for body, param in cases:
        response = httpx.post(url, json=body)
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert httpx.post(url, json={"model": "sql", "messages": [{"role": "user", "content": "x " * 600}]}).json()[
        "error"]["code"] == "context_length_exceeded"
    response = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert httpx.get(served[0] + "/v1/nothing").status_code == 404
    reply = client.chat.completions.create(model="sql", messages=MESSAGES, max_tokens=2)
    assert reply.choices[0].message.content is not None


def test_json_object_is_checked_after_generation(served):
    import httpx

    response = httpx.post(served[0] + "/v1/chat/completions", json={
        "model": "sql", "messages": MESSAGES, "temperature": 0, "max_tokens": 6,
        "response_format": {"type": "json_object"}})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_json_output"


def test_prompts_stay_out_of_the_log_unless_asked(served, client):
    client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "secret words"}], max_tokens=2)
    lines = served[2]
    assert any("/v1/chat/completions 200" in line and "model=sql" in line for line in lines)
    assert not any("secret words" in line for line in lines)


def test_a_client_that_goes_away_frees_its_slot(served):
    import httpx

    body = {"model": "sql", "messages": MESSAGES, "max_tokens": 400, "stream": True, "temperature": 1.0}
    with httpx.stream("POST", served[0] + "/v1/chat/completions", json=body) as response:
        assert next(response.iter_lines()).startswith("data: ")
    deadline = time.time() + 10
    while served[1].queued() and time.time() < deadline:
        time.sleep(0.05)
    assert served[1].queued() == 0


def test_sixteen_concurrent_streams_all_succeed_in_batches(tiny_llama, served, client):
    """The load test: 16 streaming clients at once; each answer equals the one a lone request gets."""
    expected = client.chat.completions.create(model="sql", messages=MESSAGES, temperature=0,
                                              max_tokens=12).choices[0].message.content
    results, errors = [None] * 16, []

    def one(i):
        try:
            stream = client.chat.completions.create(model="sql", messages=MESSAGES, temperature=0, max_tokens=12,
                                                    stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except Exception as e:   # a failed request is a test failure below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and results == [expected] * 16
    assert served[1].largest_batch > 1


def test_api_key_and_a_full_queue(tiny_llama, served):
    """With --api-key, requests without the key get 401; with the queue at its bound, 429 and Retry-After."""
    from fastapi.testclient import TestClient

    worker = served[1]
    keyed = TestClient(serve_app.create_app(worker, replace(ServeOptions(), api_key="k3y", max_tokens=4),
                                            lambda *_: None))
    body = {"model": "sql", "messages": MESSAGES, "max_tokens": 2}
    assert keyed.post("/v1/chat/completions", json=body).status_code == 401
    assert keyed.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k3y"}).status_code == 200
    assert keyed.get("/health").status_code == 200
    bound = worker.opts.max_queue
    worker.opts.max_queue = 0
    try:
        response = TestClient(serve_app.create_app(worker, worker.opts, lambda *_: None)).post(
            "/v1/chat/completions", json=body)
    finally:
        worker.opts.max_queue = bound
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_tool_calls_are_parsed_and_a_template_without_tools_is_said(served):
    import httpx

    calls = parse.tool_calls('<tool_call>\n{"name": "lookup", "arguments": {"q": "x"}}\n</tool_call>')
    assert calls[0]["function"] == {"name": "lookup", "arguments": json.dumps({"q": "x"})}
    assert parse.tool_calls("no calls here") is None
    tools = [{"type": "function", "function": {"name": "lookup_table", "parameters": {"type": "object"}}}]
    response = httpx.post(served[0] + "/v1/chat/completions", json={"model": "sql", "messages": MESSAGES,
                                                                   "tools": tools})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"


@pytest.mark.slow
def test_the_command_serves_the_embedded_model_as_generate_answers(smollm2_dir, tmp_path):
    """`tunelab serve --model smollm2` as a user starts it: the answer over HTTP is `tunelab generate`'s."""
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--model", "smollm2", "--port", str(port),
                                "--dtype", "float32"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model="smollm2", messages=question, temperature=0, max_tokens=30)
        assert reply.choices[0].message.content == "The capital of France is Paris."
        assert reply.choices[0].finish_reason == "stop"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_mlx_engine_serves_the_same_answers(tiny_llama, adapter_dir, served, client):
    from fastapi.testclient import TestClient

    from tests.engines.engine_params import engine_module

    engine_module("mlx")
    opts = ServeOptions(model=str(tiny_llama), adapter=[f"sql={adapter_dir}"], engine="mlx", dtype="float32",
                        max_tokens=12)
    worker = serve_app.start_worker(opts, parse.adapter_options(opts), lambda *_: None)
    try:
        app = TestClient(serve_app.create_app(worker, opts, lambda *_: None))
        for name in (served[1].base, "sql", served[1].base):
            body = {"model": name, "messages": MESSAGES, "temperature": 0, "max_tokens": 12}
            ours = app.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
            expected = client.chat.completions.create(**body).choices[0].message.content
            assert ours == expected, name
    finally:
        worker.stop()


def test_eval_scores_an_endpoint_as_it_scores_the_model_itself(tiny_llama, adapter_dir, served, tmp_path):
    """eval --compare URL#name: the served adapter's answers are those eval generates for base + adapter."""
    from tests.conftest import write_jsonl
    from tunelab.cli import main

    rows = [{"messages": [*MESSAGES[:1], {"role": "user", "content": f"What is a when b is {w}?"},
                          {"role": "assistant", "content": f"SELECT a FROM t WHERE b = '{w}'"}]}
            for w in ("x", "yy", "zzz")]
    write_jsonl(tmp_path / "data" / "test.jsonl", rows)
    assert not main(["eval", "--model", str(tiny_llama), "--adapter-path", str(adapter_dir), "--data",
                     str(tmp_path / "data"), "--no-base", "--compare", f"{served[0]}/v1#sql", "--max-tokens", "10",
                     "--metric", "exact", "--run-dir", str(tmp_path / "eval"), "--device", "cpu"])
    from tunelab import runs

    samples = [json.loads(line) for line in (tmp_path / "eval" / runs.EVAL_SAMPLES).read_text().splitlines()]
    assert len(samples) == 3
    for sample in samples:
        assert sample["answers"]["sql"] == sample["answers"]["tuned"]
    results = json.loads((tmp_path / "eval" / runs.EVAL_RESULTS).read_text())
    assert results["models"]["sql"]["source"] == "endpoint (model sql)"
    assert main(["eval", "--model", str(tiny_llama), "--data", str(tmp_path / "data"), "--no-base",
                 "--compare", "http://127.0.0.1:9/v1#sql", "--run-dir", str(tmp_path / "eval2")]) == 2
