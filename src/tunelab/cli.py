"""Command line: argv -> options -> exactly one stage function. No logic and no defaults here."""

import argparse
import errno
import sys

from tunelab import __version__
from tunelab.config import COMMAND_OPTIONS, add_arguments, resolve
from tunelab.errors import Stopped, UserError

COMMANDS = {
    "prepare": ("Build train/valid/test.jsonl chat data from a dataset, a file or builtin:sql.",
                "tunelab.data.prepare", "prepare"),
    "lora": ("Train a LoRA adapter (--train) and/or report test loss and perplexity (--test), "
             "with mlx_lm.lora's flags.", "tunelab.train", "lora"),
    "fuse": ("Merge an adapter into its base model and save a Hugging Face folder.", "tunelab.fuse", "fuse"),
    "data check": ("Show what the model will see: per split rows, token lengths, supervised share, long rows, "
                   "duplicates and leakage, and one row with its supervised tokens marked.",
                   "tunelab.data.check", "check"),
    "generate": ("Generate an answer to a prompt with a model (and optional adapter), streaming tokens.",
                 "tunelab.generate", "generate"),
    "serve": ("Serve a model and its adapters behind an OpenAI-compatible HTTP API (chat, completions, "
              "streaming), as mlx_lm.server does.", "tunelab.serve", "serve"),
    "eval": ("Generate answers to every test row with one or more models (base, base + adapter, fused, "
             ".gguf) or read them from files, score them (sql-exec, sql-canonical, exact, loss, ...), and "
             "write results, samples and an HTML report.", "tunelab.evaluate", "evaluate"),
    "export": ("Write a model (fused, or base + adapter) or an adapter alone as a GGUF file, checked by reading it "
               "back; optionally place it in LM Studio and write an Ollama Modelfile.", "tunelab.export", "export"),
    "demo": ("Run the whole workflow on the embedded SmolLM2 model and builtin:sql data.", "tunelab.demo", "demo"),
}

EXAMPLES = """examples:
  tunelab prepare --source b-mc2/sql-create-context --out my-data-chat --dedupe
  tunelab data check --data my-data-chat --model smollm2 --mask-prompt
  tunelab lora --train --model smollm2 --data my-data-chat --batch-size 1 --num-layers 4 --iters 1000 --mask-prompt
  tunelab lora --test --model smollm2 --data my-data-chat --adapter-path adapters
  tunelab fuse --model smollm2 --adapter-path adapters --save-path my-model
  tunelab generate --model my-model --prompt "..."
  tunelab serve --model smollm2 --adapter sql=adapters
  tunelab eval --model smollm2 --adapter-path adapters --data my-data-chat --compare my-model
  tunelab export --model my-model --outtype q8_0 --lmstudio --ollama
  tunelab demo
"""


def build_parser():
    parser = argparse.ArgumentParser(prog="tunelab", description="Fine-tune a small language model on your own "
                                     "machine, and use the result.", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups = {}
    for name, (help_text, _, _) in COMMANDS.items():
        group, _, action = name.partition(" ")   # "data check": command `data`, action `check`
        if action:
            if group not in groups:
                groups[group] = sub.add_parser(group, help=f"{group} commands: " + ", ".join(
                    n.partition(" ")[2] for n in COMMANDS if n.startswith(group + " ")))
                groups[group] = (groups[group], groups[group].add_subparsers(dest="action", metavar="ACTION"))
            p = groups[group][1].add_parser(action, help=help_text, description=help_text)
        else:
            p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p, COMMAND_OPTIONS[name])
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    command = f"{args.command} {args.action}" if getattr(args, "action", None) else args.command
    if command not in COMMANDS:
        parser.parse_args([args.command, "--help"])
    _, module_name, function_name = COMMANDS[command]
    try:
        opts = resolve(COMMAND_OPTIONS[command], args)
        import importlib

        stage = getattr(importlib.import_module(module_name), function_name)
        stage(opts)
    except UserError as e:
        print(f"tunelab {command}: error: " + "\n  ".join(e.problems), file=sys.stderr)
        return 2
    except OSError as e:
        # The machine's state (a full disk, permissions, a read-only mount), not a bug: name the file and why.
        full = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        hints = {**dict.fromkeys(full, "free some space; nothing already saved was changed"),
                 errno.EROFS: "the file system is read-only: choose a folder you can write to",
                 errno.EACCES: "check its permissions, or choose a folder you can write to",
                 errno.EPERM: "check its permissions, or choose a folder you can write to",
                 errno.EISDIR: "it is a folder: give a file's path",
                 errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path"}
        if e.errno not in hints:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"tunelab {command}: error: {where}{e.strerror or e}: {hints[e.errno]}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"tunelab {command}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"\ntunelab {command}: interrupted", file=sys.stderr)
        return 130
    return 0
