"""Load test of OpenAI-compatible servers on the same prompts: N concurrent streaming clients.

For each server: requests that failed, completion tokens per second over the whole run, and the time to
the first answer token (p50, p95). Greedy answers of `max_tokens` at most; every server gets the same
chat prompts (builtin:sql questions with their schema).

  python bench/serve_load.py --clients 16 --requests 32 --max-tokens 48 \
      --server tunelab --server mlx_lm --server llama_cpp:tunelab-demo/smollm2-f16.gguf

tunelab: `tunelab serve --model smollm2` (tunelab:N: --max-batch N, default 16); mlx_lm: `mlx_lm.server` on the embedded model's imported folder
(mlx[cpu] on Linux: a reference BLAS, so not a speed comparison of MLX itself); llama_cpp:FILE:
llama-cpp-python's server on a GGUF file (pip install 'llama-cpp-python[server]').
"""

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(count):
    from tunelab.data import builtin_sql

    rows = builtin_sql.generate(count, seed=1)
    return [[{"role": "system", "content": f"Answer with one SQL query.\nSCHEMA:\n{r['context']}"},
             {"role": "user", "content": r["question"]}] for r in rows]


def start(kind, port, threads):
    from tunelab import models

    if kind.split(":")[0] == "tunelab":      # tunelab:N: batches of N at most (default 16)
        batch = kind.split(":")[1] if ":" in kind else "16"
        command = [sys.executable, "-m", "tunelab", "serve", "--model", "smollm2", "--port", str(port),
                   "--max-batch", batch, "--dtype", "float32"]
        name = "smollm2"
    elif kind == "mlx_lm":
        folder = models.resolve("smollm2", log=lambda *_: None)
        command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), "--port", str(port)]
        name = str(folder)
    else:
        gguf = kind.split(":", 1)[1]
        command = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
                   "--n_threads", str(threads), "--n_ctx", "2048",   # the chat template is the file's own
                   "--interrupt_requests", "False"]   # by default a new request cuts the running one short
        name = gguf
    log = tempfile.TemporaryFile(mode="w+")    # a pipe would fill up with the server's own log and stall it
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    process.log = log
    return process, name


def wait_ready(port, process, timeout=600):
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            process.log.seek(0)
            raise RuntimeError(process.log.read()[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not start")


def load(port, name, messages, clients, requests, max_tokens):
    import openai

    from transformers import AutoTokenizer

    from tunelab import models

    tokenizer = AutoTokenizer.from_pretrained(str(models.resolve("smollm2", log=lambda *_: None)))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=3600)
    todo = list(range(requests))
    lock = threading.Lock()
    firsts, tokens, failures = [], [], []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            started = time.perf_counter()
            first, count, text = None, None, []
            try:
                stream = client.chat.completions.create(model=name, messages=messages[i % len(messages)],
                                                        temperature=0, max_tokens=max_tokens, stream=True,
                                                        stream_options={"include_usage": True})
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        text.append(chunk.choices[0].delta.content)
                        if first is None:
                            first = time.perf_counter() - started
                    if chunk.usage is not None:
                        count = chunk.usage.completion_tokens
                if count is None:   # a server that does not send usage: the answer's tokens, counted here
                    count = len(tokenizer.encode("".join(text), add_special_tokens=False))
            except Exception as e:   # a failed request is counted and shown
                with lock:
                    failures.append(repr(e)[:200])
                continue
            with lock:
                firsts.append(first if first is not None else time.perf_counter() - started)
                tokens.append(count)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    firsts.sort()
    return {"failed": len(failures), "requests": requests, "seconds": round(seconds, 1),
            "completion_tokens": sum(tokens), "tokens_per_s": round(sum(tokens) / seconds, 1),
            "ttft_p50_s": round(statistics.median(firsts), 2) if firsts else None,
            "ttft_p95_s": round(firsts[min(len(firsts) - 1, int(0.95 * len(firsts)))], 2) if firsts else None,
            "first_failure": failures[0] if failures else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", action="append", default=None)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    messages = prompts(args.requests)
    for kind in args.server or ["tunelab"]:
        port = free_port()
        process, name = start(kind, port, args.threads)
        try:
            wait_ready(port, process)
            load(port, name, messages, 1, 1, 4)          # warm-up
            result = load(port, name, messages, args.clients, args.requests, args.max_tokens)
        finally:
            process.terminate()
            process.wait(timeout=60)
        print(json.dumps({"server": kind if kind.startswith("tunelab") else kind.split(":")[0], "clients": args.clients, "max_tokens": args.max_tokens,
                          **result}), flush=True)


if __name__ == "__main__":
    main()
