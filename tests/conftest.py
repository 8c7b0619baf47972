"""Shared fixtures: a tiny byte-level BPE tokenizer with a ChatML template, and tiny models.

The tiny models (a 2-layer Llama with tied embeddings, a 2-layer Qwen2 with q/k/v biases) are
written once per session as real Hugging Face folders, so every test goes through the same
loading code a user's model does.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tunelab.data import builtin_sql

# Imported models go to a cache of the test run's own (or TUNELAB_CACHE when set), never
# silently into the user's; subprocesses inherit it.
_OWN_CACHE = None if os.environ.get("TUNELAB_CACHE") else tempfile.mkdtemp(prefix="tunelab-test-cache-")
if _OWN_CACHE:
    os.environ["TUNELAB_CACHE"] = _OWN_CACHE


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus():
    rows = builtin_sql.generate(300, seed=1)
    for r in rows:
        yield f"{r['context']} {r['question']} {r['answer']}"
    yield "You are an text to SQL query translator. Users will ask you questions in English SCHEMA system user assistant"


def make_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder))
    return fast


def make_model(folder, arch, layers=2):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tokenizer = make_tokenizer(folder)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_theta=10000.0,
                  initializer_range=0.3)  # wide enough that logits can become confident
    if arch == "llama":
        config = LlamaConfig(tie_word_embeddings=True, **common)
    else:
        config = Qwen2Config(tie_word_embeddings=True, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    # Larger random biases so a wrong bias path shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request, tiny_llama, tiny_qwen2):
    return {"llama": tiny_llama, "qwen2": tiny_qwen2}[request.param]


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))


def builtin_sql_data(folder, num_rows, valid_rows=5, test_rows=5):
    """A data folder of builtin:sql rows made by `prepare` (train gets num_rows - valid - test)."""
    from tunelab.config import PrepareOptions
    from tunelab.data.prepare import prepare

    prepare(PrepareOptions(out=str(folder), num_rows=num_rows, valid_rows=valid_rows, test_rows=test_rows),
            log=lambda *_: None)
    return folder


def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2, imported once into the test cache (slow tests only)."""
    from tunelab import models

    return models.resolve("smollm2", log=lambda *_: None)


# A ChatML template that renders tools and tool calls (in the manner of Qwen2.5's), for tools rows.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n"
    "{% endif %}Tools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}{%- if m['role'] == 'system' %}"
    "{%- elif m['role'] == 'assistant' and m.get('tool_calls') %}<|im_start|>assistant\n"
    "{% if m.get('content') %}{{ m['content'] }}{% endif %}{% for c in m['tool_calls'] %}"
    "<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>{{ m['content'] }}</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

MULTI_TURN = {"messages": [
    {"role": "system", "content": "SCHEMA: CREATE TABLE t (a INTEGER, b VARCHAR)"},
    {"role": "user", "content": "What is a?"},
    {"role": "assistant", "content": "SELECT a FROM t"},
    {"role": "user", "content": "And b, when a is 3?"},
    {"role": "assistant", "content": "SELECT b FROM t WHERE a = 3"}]}

TOOLS_ROW = {
    "tools": [{"type": "function", "function": {"name": "run_sql", "description": "Run a SQL query",
                                                "parameters": {"type": "object",
                                                               "properties": {"query": {"type": "string"}}}}}],
    "messages": [
        {"role": "user", "content": "How many rows has t?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "run_sql", "arguments": {"query": "SELECT COUNT(*) FROM t"}}}]},
        {"role": "tool", "content": "[[42]]"},
        {"role": "assistant", "content": "t has 42 rows."}]}
