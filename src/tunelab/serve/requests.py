"""What a request asks for, checked field by field (every value comes from a client: untrusted)."""

import json
import math
import re
import secrets
from pathlib import Path

from tunelab.errors import UserError

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20


class BadRequest(Exception):
    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


def _number(body, key, default, low, high):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise BadRequest(f"{key}: expected a number from {low} to {high}, got {value!r}", key)
    return float(value)


def _whole(body, key, low, high=None):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise BadRequest(f"{key}: expected a whole number {bound}, got {value!r}", key)
    return value


def settings(body):
    """The sampling and response settings of a chat or completions request."""
    n = _whole(body, "n", 1)
    if n not in (None, 1):
        raise BadRequest("n: only 1 choice per request here", "n")
    max_tokens = _whole(body, "max_completion_tokens", 1) or _whole(body, "max_tokens", 1)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) for s in stop):
        raise BadRequest(f"stop: expected a string or a list of up to {MAX_STOPS} strings", "stop")
    logprobs = body.get("logprobs")
    top = body.get("top_logprobs")
    if isinstance(logprobs, int) and not isinstance(logprobs, bool):   # completions: logprobs is the count
        top, logprobs = logprobs, True
    if logprobs not in (None, True, False):
        raise BadRequest("logprobs: expected true or false", "logprobs")
    if top is not None:
        top = _whole({"top_logprobs": top}, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream: expected true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options: expected an object", "stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"seed: expected a whole number, got {seed!r}", "seed")
    fmt = body.get("response_format") or {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object"):
        raise BadRequest("response_format: only {\"type\": \"text\"} and {\"type\": \"json_object\"} here",
                         "response_format")
    return {"max_tokens": max_tokens, "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0), "seed": seed if seed is not None else 0,
            "stop": stop, "top_logprobs": (top or 0) if logprobs else None, "stream": stream,
            "include_usage": bool(options.get("include_usage")), "json_object": fmt["type"] == "json_object"}


def _text(content, where):
    """A message's content: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"{where}.content: expected a string or a list of text parts", where)


def messages(body):
    """(messages, tools) of a chat request, checked."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages: expected a non-empty list of messages", "messages")
    out = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where}: expected an object with role and content", where)
        role = message.get("role")
        if role not in ROLES:
            raise BadRequest(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}", f"{where}.role")
        item = {"role": "system" if role == "developer" else role}
        if message.get("content") is not None:
            item["content"] = _text(message["content"], where)
        elif not message.get("tool_calls"):
            raise BadRequest(f"{where}.content: missing", where)
        if message.get("tool_calls"):
            item["tool_calls"] = _tool_calls_in(message["tool_calls"], where)
        if role == "tool" and isinstance(message.get("tool_call_id"), str):
            item["tool_call_id"] = message["tool_call_id"]
        out.append(item)
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools)):
        raise BadRequest("tools: expected a list of {type: function, function: {name, ...}}", "tools")
    return out, tools or None


def _tool_calls_in(calls, where):
    if not isinstance(calls, list):
        raise BadRequest(f"{where}.tool_calls: expected a list", where)
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"{where}.tool_calls: each needs function.name", where)
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            raise BadRequest(f"{where}.tool_calls: function.arguments is not JSON", where) from None
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def chat_prompt(tokenizer, messages, tools):
    """Token ids of the conversation through the model's chat template, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequest("this model has no chat template: use /v1/completions", "messages")
    extra = {"tools": tools} if tools else {}
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    except Exception as e:   # the template itself refuses (roles out of order, no system role, ...)
        raise BadRequest(f"messages: the model's chat template refused them: {e}", "messages") from None
    if tools and not all(t["function"]["name"] in text for t in tools):
        raise BadRequest("tools: this model's chat template does not render tools", "tools")
    return tokenizer.encode(text, add_special_tokens=False)


def completion_prompt(tokenizer, body):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt: expected a string (one prompt per request)", "prompt")
    return tokenizer.encode(prompt, add_special_tokens=True)


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def tool_calls(text):
    """OpenAI tool_calls from the <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks that chat
    templates with tools ask the model for (Qwen's, Hermes'); None when the answer has none."""
    calls = []
    for found in _TOOL_CALL.finditer(text):
        try:
            call = json.loads(found[1])
        except ValueError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        calls.append({"id": "call_" + secrets.token_hex(8), "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}})
    return calls or None


def json_object_problem(text):
    """Why `text` is not a JSON object (None when it is)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        return str(e)
    return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


def adapter_options(opts):
    """{name: folder} of --adapter name=path (and --adapter-path, named after its folder)."""
    found, problems = {}, []
    given = list(opts.adapter or [])
    if opts.adapter_path:
        given.append(f"{Path(opts.adapter_path).resolve().name}={opts.adapter_path}")
    for item in given:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            problems.append(f"--adapter {item}: expected name=folder")
        elif name in found:
            problems.append(f"--adapter {item}: the name {name} is given twice")
        elif not Path(path).is_dir():
            problems.append(f"--adapter {item}: folder not found")
        else:
            found[name] = path
    UserError.raise_if(problems)
    return found
