"""The HTTP side of `tunelab serve`: FastAPI routes in OpenAI's shapes, served by uvicorn."""

import asyncio
import copy
import json
import secrets
import sys
import time

from tunelab.data.templates import end_of_turn_ids
from tunelab.errors import UserError
from tunelab.serve import requests as parse
from tunelab.serve.worker import Job, QueueFull, Worker


class ApiError(Exception):
    """An OpenAI-shaped error: HTTP status, message, type, param, code."""

    def __init__(self, status, message, kind="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def create_app(worker, opts, log=print):
    """The FastAPI application over a started `worker`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None, openapi_url=None)
    # the requests' own copy of the tokenizer: a Rust tokenizer used from two threads at once can fail
    # ("Already borrowed"), and the worker thread decodes while requests are encoded here
    tokenizer = copy.deepcopy(worker.model.tokenizer)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        try:
            if opts.api_key and request.url.path != "/health":
                given = request.headers.get("authorization", "")
                if not secrets.compare_digest(given.encode(), f"Bearer {opts.api_key}".encode()):
                    raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                   "authentication_error", code="invalid_api_key")
            response = await call_next(request)
        except ApiError as e:
            response = JSONResponse(e.body(), status_code=e.status,
                                    headers={"Retry-After": "1"} if e.status == 429 else None)
        except Exception as e:   # a fault of ours: logged here, the client gets no traceback
            log(f"error: {request.method} {request.url.path}: {type(e).__name__}: {e}")
            response = JSONResponse(ApiError(500, "internal error while serving the request", "server_error").body(),
                                    status_code=500)
        extra = getattr(request.state, "summary", "")
        log(f"{request.method} {request.url.path} {response.status_code} {time.perf_counter() - started:.2f}s"
            f"{extra}")
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": worker.queued()}

    @app.get("/v1/models")
    async def list_models():
        created = int(worker.started)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "tunelab"} for name in worker.names]}

    async def run(request, chat):
        body = await _json_body(request)
        model = body.get("model")
        if model not in worker.names:
            raise ApiError(404, f"the model {model!r} does not exist here (this server has "
                                f"{', '.join(worker.names)})", param="model", code="model_not_found")
        try:
            settings = parse.settings(body)
            if chat:
                messages, tools = parse.messages(body)
                prompt = parse.chat_prompt(tokenizer, messages, tools)
                stop_ids = end_of_turn_ids(tokenizer)
            else:
                prompt = parse.completion_prompt(tokenizer, body)
                stop_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        except parse.BadRequest as e:
            raise ApiError(400, str(e), param=e.param) from None
        room = worker.context - len(prompt)
        if room <= 0:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens, and the model's context is {worker.context}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        max_tokens = min(settings["max_tokens"] or opts.max_tokens, room)
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        job = Job(model=model, prompt=prompt, max_tokens=max_tokens, temperature=settings["temperature"],
                  top_p=settings["top_p"], seed=settings["seed"], stop=settings["stop"], stop_ids=frozenset(stop_ids),
                  top_logprobs=settings["top_logprobs"],
                  deliver=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            worker.submit(job)
        except QueueFull:
            raise ApiError(429, f"the server is busy ({opts.max_queue} requests queued or running); retry shortly",
                           "rate_limit_error", code="queue_full") from None
        request.state.summary = f" model={model} prompt={len(prompt)}"
        if opts.log_prompts:
            log(f"prompt: {tokenizer.decode(prompt)!r}")
        shape = _Shape(chat, model, settings, tokenizer, bool(chat and body.get("tools")))
        if settings["stream"]:
            return StreamingResponse(_stream(job, events, shape, worker, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await _whole(job, events, shape, worker, request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    @app.exception_handler(404)
    async def not_found(request, exc):
        return JSONResponse(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found").body(),
                            status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request, exc):
        return JSONResponse(ApiError(405, f"{request.method} is not allowed on {request.url.path}").body(),
                            status_code=405)

    return app


async def _json_body(request):
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


class _Shape:
    """OpenAI's response and chunk shapes for one request."""

    def __init__(self, chat, model, settings, tokenizer, tools):
        self.chat, self.model, self.settings, self.tokenizer, self.tools = chat, model, settings, tokenizer, tools
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def logprobs(self, entries, offset=0):
        if self.settings["top_logprobs"] is None:
            return None
        decode = self.tokenizer.decode
        if self.chat:
            return {"content": [{"token": decode([t]), "logprob": lp, "bytes": list(decode([t]).encode()),
                                 "top_logprobs": [{"token": decode([u]), "logprob": v, "bytes": list(decode([u]).encode())}
                                                  for u, v in top]} for t, lp, top in entries]}
        tokens = [decode([t]) for t, _, _ in entries]
        offsets, at = [], offset
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{decode([u]): v for u, v in top} for _, _, top in entries], "text_offset": offsets}

    def chunk(self, delta=None, finish=None, entries=(), first=False, offset=0):
        if self.chat:
            content = {} if delta is None else {"content": delta}
            if first:
                content = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": content, "logprobs": self.logprobs(entries) if entries else None,
                      "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": self.logprobs(entries, offset) if entries else None,
                      "finish_reason": finish}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}

    def whole(self, text, finish, entries, usage):
        if self.chat:
            message = {"role": "assistant", "content": text}
            calls = parse.tool_calls(text) if self.tools else None
            if calls:
                message = {"role": "assistant", "content": None, "tool_calls": calls}
                finish = "tool_calls"
            choice = {"index": 0, "message": message, "logprobs": self.logprobs(entries), "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": self.logprobs(entries), "finish_reason": finish}
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage}


async def _next(events, worker, job, request):
    """The job's next event; a client that disconnects meanwhile has its job dropped."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                worker.free_slot(job)
                raise asyncio.CancelledError() from None


async def _collect(job, events, worker, request):
    """(text, finish reason, logprob entries, usage) of the whole answer."""
    parts, entries = [], []
    while True:
        event = await _next(events, worker, job, request)
        if event[0] == "delta":
            parts.append(event[1])
            entries += event[2]
        elif event[0] == "done":
            return "".join(parts), event[1], entries, event[2]
        else:
            raise ApiError(500, event[1], "server_error")


async def _whole(job, events, shape, worker, request):
    text, finish, entries, usage = await _collect(job, events, worker, request)
    _check_format(shape, text)
    request.state.summary += f" completion={usage['completion_tokens']}"
    return shape.whole(text, finish, entries, usage)


def _check_format(shape, text):
    if shape.settings["json_object"]:
        problem = parse.json_object_problem(text)
        if problem:
            raise ApiError(422, f"response_format json_object: the model's answer is not a JSON object ({problem})",
                           param="response_format", code="invalid_json_output")


def _sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(job, events, shape, worker, request):
    """Server-sent events in OpenAI's chunk format; text that must be checked whole (json_object, tool calls) is
    sent as one chunk once complete."""
    try:
        if shape.chat:
            yield _sse(shape.chunk(first=True))
        whole = shape.settings["json_object"] or shape.tools
        if whole:
            text, finish, entries, usage = await _collect(job, events, worker, request)
            try:
                _check_format(shape, text)
            except ApiError as e:
                yield _sse(e.body())
                yield "data: [DONE]\n\n"
                return
            reply = shape.whole(text, finish, entries, usage)["choices"][0]
            if shape.chat and "tool_calls" in reply["message"]:
                chunk = shape.chunk(finish=None)
                chunk["choices"][0]["delta"] = {"tool_calls": [dict(c, index=i) for i, c in
                                                               enumerate(reply["message"]["tool_calls"])]}
                yield _sse(chunk)
                finish = "tool_calls"
            else:
                yield _sse(shape.chunk(text, entries=entries))
        else:
            offset = 0
            while True:
                event = await _next(events, worker, job, request)
                if event[0] == "delta":
                    yield _sse(shape.chunk(event[1], entries=event[2], offset=offset))
                    offset += len(event[1])
                elif event[0] == "done":
                    finish, usage = event[1], event[2]
                    break
                else:
                    yield _sse(ApiError(500, event[1], "server_error").body())
                    yield "data: [DONE]\n\n"
                    return
        yield _sse(shape.chunk(finish=finish))
        if shape.settings["include_usage"]:
            yield _sse({**shape.chunk(), "choices": [], "usage": usage})
        request.state.summary += f" completion={usage['completion_tokens']}"
        yield "data: [DONE]\n\n"
    finally:
        worker.free_slot(job)


def serve(opts, log=None):
    """`tunelab serve`: load the model, then answer HTTP requests until stopped (Ctrl-C)."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"tunelab serve needs {' and '.join(missing)}, not installed: pip install 'tunelab[serve]'")
    import uvicorn

    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    adapters = parse.adapter_options(opts)
    worker = start_worker(opts, adapters, log)
    app = create_app(worker, opts, log)
    log(f"Serving {', '.join(worker.names)} at http://{opts.host}:{opts.port}/v1 (OpenAI-compatible; Ctrl-C stops)")
    try:
        uvicorn.run(app, host=opts.host, port=opts.port, log_level="warning", access_log=False)
    finally:
        worker.stop()


def start_worker(opts, adapters, log):
    worker = Worker(opts, adapters, log)
    worker.started = time.time()
    worker.start()
    worker.wait_ready()
    return worker
