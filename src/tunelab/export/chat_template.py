"""Chat templates checked before an export embeds them (a GGUF's tokenizer.chat_template, an Ollama Modelfile).

A template travels into llama.cpp, LM Studio and Ollama as text that nobody there checks until a
user chats, so it is parsed and rendered here first, in the sandboxed Jinja environment
`apply_chat_template` uses: on a system + user + assistant conversation, and on system + user with
the generation prompt. Templates that refuse a system message by design (`raise_exception`, as
Gemma's does) are rendered again without one; any other failure is the template's fault.
"""

from pathlib import Path

from tunelab.errors import UserError

SYSTEM = {"role": "system", "content": "You answer in SQL."}
SAMPLE = [{"role": "user", "content": "What is a?"}, {"role": "assistant", "content": "SELECT a FROM t"}]


def template_source(model_dir):
    """The file a folder's chat template is read from: chat_template.jinja (transformers prefers it) when present,
    else tokenizer_config.json."""
    jinja = Path(model_dir) / "chat_template.jinja"
    return jinja if jinja.is_file() else Path(model_dir) / "tokenizer_config.json"


def _render_all(tokenizer, template, system):
    lead = [SYSTEM] if system else []
    tokenizer.apply_chat_template(lead + SAMPLE, tokenize=False, chat_template=template)
    tokenizer.apply_chat_template(lead + SAMPLE[:1], tokenize=False, add_generation_prompt=True,
                                  chat_template=template)


def check(tokenizer, model_dir):
    """UserError naming the template's file and the Jinja error unless the tokenizer's chat template (if it has
    one) parses and renders a small conversation."""
    import jinja2

    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return
    try:
        try:
            _render_all(tokenizer, template, system=True)
        except jinja2.TemplateError as e:
            if type(e) is not jinja2.TemplateError:   # only raise_exception raises the base class itself
                raise
            _render_all(tokenizer, template, system=False)
    except Exception as e:  # a template can fail in any way Python can; each is the template's fault
        line = f" line {e.lineno}" if isinstance(e, jinja2.TemplateSyntaxError) and e.lineno else ""
        message = e.message if isinstance(e, jinja2.TemplateError) and e.message else str(e)
        raise UserError(f"{template_source(model_dir)}: the chat template{line} does not render: "
                        f"{type(e).__name__}: {message}. Fix the template (or remove it) before exporting; "
                        "nothing was written") from None
