"""`tunelab serve`: a model, and adapters on it, behind an OpenAI-compatible HTTP API.

  POST /v1/chat/completions   messages through the model's chat template (tools where it renders them)
  POST /v1/completions        raw text
  GET  /v1/models, GET /health

One worker thread owns the model: requests wait in a bounded queue (full: HTTP 429 with Retry-After),
and those for the same model that are waiting together are generated as one batch (dynamic batching,
up to --max-batch rows). The request's `model` picks the base model or one adapter; adapters are kept
in memory and swapped onto the loaded base when a batch needs another one, never reloading the base.
A streaming client that goes away has its row dropped and its queue slot freed at once.

Bad requests get OpenAI-shaped error bodies ({"error": {"message", "type", "param", "code"}}) with a 4xx
status; the server logs one line per request, without prompt contents unless --log-prompts.
"""

from tunelab.serve.app import serve

__all__ = ["serve"]
