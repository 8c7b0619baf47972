"""Answers from an OpenAI-compatible endpoint (`eval --compare http://127.0.0.1:8080/v1#name`): the model a
user actually serves (tunelab serve, LM Studio, Ollama, llama.cpp's server, mlx_lm.server), scored on the
same rows as the others. Requests go out a few at a time (servers batch them); OPENAI_API_KEY, when set,
is sent as the bearer token. The standard library's HTTP client: no extra package."""

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from tunelab.errors import UserError

PARALLEL = 4
TIMEOUT = 600


def is_url(reference):
    return reference.startswith(("http://", "https://"))


def split(reference):
    """(base URL, model name or '') of URL#name."""
    url, _, name = reference.partition("#")
    return url.rstrip("/"), name


def _call(url, path, body=None):
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    request = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", {}).get("message")
        except (ValueError, AttributeError):
            message = None
        raise UserError(f"{url}{path}: HTTP {e.code}: {message or e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"{url}{path}: no answer from the endpoint ({getattr(e, 'reason', e)}): is the server "
                        "running at that address?") from None
    except ValueError:
        raise UserError(f"{url}{path}: the answer is not JSON: not an OpenAI-compatible endpoint?") from None


def answers(url, model, rows, opts, label):
    """(answers in row order, completion tokens the endpoint reported) for `rows`' prompts, greedy unless
    --temp says otherwise. `model` '' asks the endpoint for its first model."""
    if not model:
        listed = _call(url, "/models").get("data") or []
        if not listed:
            raise UserError(f"{url}/models: the endpoint lists no model: name one as {url}#NAME")
        model = listed[0]["id"]

    def one(row):
        body = {"model": model, "messages": row.prompt, "max_tokens": opts.max_tokens, "temperature": opts.temp,
                "top_p": opts.top_p, "seed": opts.seed}
        if row.tools:
            body["tools"] = row.tools
        reply = _call(url, "/chat/completions", body)
        try:
            text = reply["choices"][0]["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise UserError(f"{url}/chat/completions: an answer without choices[0].message: not an "
                            "OpenAI-compatible endpoint?") from None
        used = (reply.get("usage") or {}).get("completion_tokens")
        return text.strip(), used if isinstance(used, int) else 0

    with ThreadPoolExecutor(PARALLEL) as pool, tqdm(total=len(rows), desc=f"Asking ({label})", unit="row",
                                                    dynamic_ncols=True, disable=None) as bar:
        results = []
        for result in pool.map(one, rows):
            results.append(result)
            bar.update(1)
    return [text for text, _ in results], sum(used for _, used in results)
