"""The generate stage: one prompt in, tokens streamed out until the end of the turn."""

import sys

from tunelab import engines, models
from tunelab.data.templates import end_of_turn_ids


def prompt_ids(tokenizer, prompt, system_prompt=None, raw=False):
    if raw or not getattr(tokenizer, "chat_template", None):
        return tokenizer.encode(prompt, add_special_tokens=True)
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def stream_text(engine, model, ids, opts, out=sys.stdout):
    """Generate, writing text to `out` as it comes; return the whole answer."""
    tokenizer = model.tokenizer
    generated, shown = [], ""
    for token in engine.generate(model, ids, max_tokens=opts.max_tokens, temp=opts.temp, top_p=opts.top_p,
                                 seed=opts.seed, stop_ids=end_of_turn_ids(tokenizer)):
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tokenizer.decode(generated, skip_special_tokens=True)
    out.write(text[len(shown):] + "\n")
    out.flush()
    return text


def generate(opts, log=print):
    prompt = sys.stdin.read() if opts.prompt == "-" else opts.prompt
    engine, model, model_dir = engines.load(opts.model, opts.adapter_path, opts.device, log=log, engine=opts.engine)
    models.check_finite_weights(model_dir)
    ids = prompt_ids(model.tokenizer, prompt, opts.system_prompt, raw=opts.ignore_chat_template)
    log("=" * 10)
    return stream_text(engine, model, ids, opts)
