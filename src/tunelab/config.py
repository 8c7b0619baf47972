"""Every option of every command, declared once: type, default, help.

Each command's options are a dataclass; its CLI flags (`--batch-size`) and YAML keys
(`batch_size`, or `batch-size`) come from the field names. Values merge as
defaults < config file (`-c`) < command line. Flags default to "not given", so a value from
the config file is never silently replaced by a flag's default. Unknown keys, wrong types
and contradictions are all gathered and reported at once.
"""

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunelab.errors import UserError, utf8_text

DEFAULT_MODEL = "smollm2"


def opt(default, help, *, kind=None, short=None, choices=None, metavar=None, const=None):
    """Declare one option. `kind` is the value type (inferred from the default when omitted);
    with `const`, the flag's value may be left out and then is `const`."""
    kind = kind or (type(default) if default is not None else str)
    return field(
        default=default,
        metadata={"help": help, "kind": kind, "short": short, "choices": choices, "metavar": metavar,
                  "const": const},
    )


def list_of_str(text):
    return [part.strip() for part in text.split(",") if part.strip()]


def mappings(text):
    """A mapping or a list of mappings: YAML in a config file; JSON text on the command line."""
    import json

    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a JSON object or a list of them, got {text!r}") from None
    if not isinstance(value, (dict, list)):
        raise argparse.ArgumentTypeError(f"expected a JSON object or a list of them, got {text!r}")
    return value


def size(text):
    """A size in bytes: a number, or with M/MB (10^6) or G/GB (10^9) after it, as mlx-lm reads them."""
    import re

    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(M|MB|G|GB|)\s*", str(text), re.IGNORECASE)
    if not found:
        raise argparse.ArgumentTypeError(f"expected a size such as 512MB or 2GB, got {text!r}")
    return int(float(found[1]) * {"": 1, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}[found[2].upper()])


def mapping(text):
    """A mapping: YAML in a config file; JSON text on the command line."""
    import json

    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def schedule(text):
    """A learning-rate schedule: a shorthand name on the command line; in a config file also mlx-lm's
    mapping (name, arguments, warmup, warmup_init)."""
    return text


@dataclass
class PrepareOptions:
    source: str = opt(
        "builtin:sql",
        "Where rows come from: a Hugging Face dataset id (e.g. b-mc2/sql-create-context), "
        "a local .jsonl/.json/.csv/.parquet file, or builtin:sql (text-to-SQL rows generated here).",
    )
    out: str = opt("data", "Folder to write train.jsonl, valid.jsonl and test.jsonl into.", short="-o")
    split: str = opt("train", "Split of a Hugging Face dataset to read.")
    dataset_config: str = opt(None, "Configuration (subset) name of a Hugging Face dataset.")
    revision: str = opt(None, "Revision (branch, tag or commit) of a Hugging Face dataset.")
    keep_splits: bool = opt(False, "Use the dataset's own train/validation/test splits instead of splitting one.")
    system: str = opt(
        "You are an text to SQL query translator. Users will ask you questions in English and you "
        "will generate a SQL query based on the provided SCHEMA.\nSCHEMA:\n{context}",
        "System message template; {field} inserts a source field. Empty string: no system message.",
    )
    user: str = opt("{question}", "User message template.")
    assistant: str = opt("{answer}", "Assistant message template.")
    num_rows: int = opt(150, "Rows to select after shuffling (-1: all).")
    valid_rows: float = opt(25, "Rows for valid.jsonl: a count, or a share of the rows below 1 (e.g. 0.1).",
                            kind=float)
    test_rows: float = opt(25, "Rows for test.jsonl (a count or a share); the rest go to train.jsonl.", kind=float)
    seed: int = opt(0, "Seed for the shuffle (and for builtin:sql's generator).")
    overwrite: bool = opt(False, "Replace an existing output folder.")
    dedupe: bool = opt(False, "Drop repeated rows inside each split, and valid/test rows whose prompt is also in train.")
    skip_invalid: bool = opt(False, "Set rows that cannot be mapped aside in <out>/rejected.jsonl instead of stopping.")


@dataclass
class LoraOptions:
    model: str = opt(DEFAULT_MODEL, "Model: a Hugging Face repo id, a local folder, a .gguf file, or "
                     "'smollm2' (the embedded SmolLM2-135M-Instruct).")
    data: str = opt("data", "Folder with train.jsonl and valid.jsonl (for --train) and test.jsonl (for --test), or "
                    "a Hugging Face dataset id with train, valid and test splits (as mlx-lm).")
    train: bool = opt(False, "Train an adapter.")
    test: bool = opt(False, "Report loss and perplexity on test.jsonl.")
    fine_tune_type: str = opt("lora", "Type of fine-tuning: lora, dora (LoRA plus a trained magnitude for each "
                              "output row of an adapted weight), or full (every weight of the top --num-layers "
                              "blocks trains; the run folder gets the whole model in <adapter-path>/model).",
                              choices=["lora", "dora", "full"])
    mask_prompt: bool = opt(None, "Train only on the answers: every assistant turn of chat rows (see --train-on), "
                            "the completion of completions rows. --test alone measures the loss as the adapter was "
                            "trained, unless --mask-prompt or --no-mask-prompt says otherwise.", kind=bool)
    num_layers: int = opt(16, "Number of final layers to train (-1: all).")
    batch_size: int = opt(4, "Rows per step (per micro-batch with --grad-accumulation-steps); in several processes "
                          "(torchrun, --nproc) the global batch, shared among them.")
    grad_accumulation_steps: int = opt(1, "Micro-batches whose gradients make one optimizer step: the step "
                                       "sees batch-size x this rows, with the memory of one micro-batch.")
    iters: int = opt(1000, "Training steps.")
    val_batches: int = opt(25, "Validation batches per evaluation (-1: the whole valid set).")
    test_batches: int = opt(500, "Test batches (-1: the whole test set).")
    learning_rate: float = opt(1e-5, "Learning rate (the peak, with --lr-schedule and --warmup).")
    epochs: int = opt(None, "Passes over train.jsonl, instead of --iters: the run takes epochs x its batches an "
                      "epoch (rows / batch size, rounded up, / --grad-accumulation-steps) steps.", kind=int)
    optimizer: str = opt("adam", "Optimizer, mlx-lm's: adam, adamw (Adam with decoupled weight decay), sgd, "
                         "adafactor or muon, with MLX's updates and defaults on both engines.",
                         choices=["adam", "adamw", "sgd", "adafactor", "muon"])
    weight_decay: float = opt(None, "Weight decay (defaults: adamw 0.01 decoupled, muon 0.01, sgd and adafactor "
                              "0, as MLX's); adam takes none.", kind=float)
    lr_schedule: object = opt("constant", "Learning-rate schedule: constant, cosine (to --min-lr at the last step) "
                              "or linear (likewise); a config file may give mlx-lm's lr_schedule mapping "
                              "(name, arguments, warmup, warmup_init).", kind=schedule, metavar="NAME")
    warmup: int = opt(0, "Steps of linear warm-up from --warmup-init to --learning-rate before the schedule.")
    warmup_init: float = opt(0.0, "Learning rate of the first warm-up step.")
    min_lr: float = opt(0.0, "Learning rate a cosine or linear schedule ends at.")
    max_grad_norm: float = opt(None, "Clip the gradients' global norm to this (default: no clipping, as mlx-lm); "
                               "the norm before clipping is logged.", kind=float)
    optimizer_config: dict = opt(None, "mlx-lm's per-optimizer settings, e.g. {adamw: {betas: [0.9, 0.98], eps: "
                                 "1e-6, weight_decay: 0.05}}, {sgd: {momentum: 0.9, nesterov: true}}, {adafactor: "
                                 "{relative_step: false}}, {muon: {ns_steps: 5}}: MLX's names and defaults.",
                                 kind=mapping, metavar="JSON")
    grad_checkpoint: bool = opt(False, "Gradient checkpointing (mlx-lm's flag): each trained block keeps only its "
                                "input for the backward pass and runs again there; less memory, about a third "
                                "more compute, the same numbers.")
    clear_cache_threshold: int = opt(None, "Free the allocator's cached memory after a step when it holds more than "
                                     "this (e.g. 2GB; 0: after every step). Default: as mlx-lm on the mlx engine "
                                     "(after every step), PyTorch's cache kept on the torch engine.",
                                     kind=size, metavar="SIZE")
    report_to: str = opt(None, "Experiment trackers to send metrics.jsonl's numbers to, comma-separated: "
                         "tensorboard, wandb, mlflow; offline in the run folder unless WANDB_MODE=online or "
                         "MLFLOW_TRACKING_URI say otherwise.")
    project_name: str = opt(None, "Project (wandb) or experiment (mlflow) name for --report-to (default tunelab).")
    trust_remote_code: bool = opt(False, "mlx-lm's flag: tunelab never runs a model's own code, so only false.")
    hf_dataset: object = opt(None, "mlx-lm's Hugging Face datasets instead of --data: {path, config, train_split "
                             "(train[:80%]), valid_split (train[-10%:]), test_split, prompt_feature, "
                             "completion_feature, text_feature, chat_feature}, or a list of them (concatenated); "
                             "their rows are written to <adapter-path>/data.", kind=mappings, metavar="JSON")
    steps_per_report: int = opt(10, "Steps between training-loss reports.")
    steps_per_eval: int = opt(200, "Steps between validation-loss evaluations.")
    save_every: int = opt(100, "Save the adapter every N steps.")
    keep_best: bool = opt(False, "Also keep the adapter of the lowest validation loss so far in "
                          "<adapter-path>/best (its step and loss in its adapter_config.json).")
    best_metric: str = opt("val_loss", "What --keep-best and --early-stop judge by: val_loss (lower is better), or a "
                           "task metric of answers generated for valid.jsonl at each validation (sql-exec, "
                           "sql-canonical, exact, normalized: higher is better).",
                           choices=["val_loss", "sql-exec", "sql-canonical", "exact", "normalized"])
    best_max_tokens: int = opt(128, "Token budget of each answer generated for --best-metric.")
    early_stop: int = opt(None, "Stop after this many validations in a row without a lower validation loss "
                          "than the best so far (the run's last adapter is saved; with --keep-best, best/ "
                          "holds the best one).", kind=int)
    adapter_path: str = opt("adapters", "Folder for the adapter, its config and metrics.jsonl (the run folder).")
    max_seq_length: int = opt(2048, "Longest row in tokens, after templating (see --long-rows).")
    long_rows: str = opt("truncate", "Rows longer than --max-seq-length: truncate (keeping the supervised part "
                         "where it fits) or drop; either way they are counted.", choices=["truncate", "drop"])
    train_on: str = opt("all", "With --mask-prompt, which assistant turns of multi-turn chat rows to train on.",
                        choices=["all", "last"])
    chat_template: str = opt(None, "Chat template for a model without one: 'chatml' or a Jinja file.")
    skip_invalid: bool = opt(False, "Leave out invalid data rows, writing them with their problems to "
                             "<adapter-path>/rejected-<split>.jsonl, instead of stopping.")
    seed: int = opt(0, "Random seed (adapter init, batch order).")
    resume: bool = opt(False, "Continue the interrupted run in --adapter-path from its newest checkpoint, exactly "
                       "(adapter, optimizer, data position, random state); the options must be the run's.")
    resume_adapter_file: str = opt(None, "Start from this adapter's weights (mlx-lm's adapters.safetensors or "
                                   "PEFT's adapter_model.safetensors), with a fresh optimizer, into a new "
                                   "--adapter-path (mlx-lm's flag).")
    keep_checkpoints: int = opt(2, "Checkpoints kept in <adapter-path>/checkpoints (the newest); an older one is "
                                "removed only after a newer one is complete.")
    max_bad_steps: int = opt(3, "Steps in a row whose loss or gradients are NaN or infinite (each is skipped, "
                             "changing nothing) before training stops, the last good checkpoint kept.")
    lora_rank: int = opt(8, "LoRA rank r.")
    lora_scale: float = opt(20.0, "LoRA scale (PEFT's lora_alpha / r).")
    lora_dropout: float = opt(0.0, "LoRA dropout.")
    lora_keys: list = opt(None, "Comma-separated module names inside a block to adapt, e.g. "
                          "self_attn.q_proj,self_attn.v_proj (default: every linear layer).",
                          kind=list_of_str, metavar="KEYS")
    engine: str = opt("auto", "Compute engine: mlx (Apple silicon) or torch (NVIDIA GPUs, CPUs); auto picks mlx on "
                      "Apple silicon when it is installed, torch elsewhere.", choices=["auto", "torch", "mlx"])
    device: str = opt("auto", "Compute device.", choices=["auto", "cpu", "cuda", "mps"])
    dtype: str = opt("auto", "Compute dtype (auto: bfloat16 on GPUs, and for --train on CPUs with bfloat16 matrix instructions, "
                     "adapters and optimizer state staying float32; else float32).",
                     choices=["auto", "float32", "bfloat16", "float16"])
    nproc: int = opt(None, "Train in this many processes on this machine (torchrun, torch engine): each takes its "
                     "share of every --batch-size rows (the global batch) and rank 0 writes. For several machines "
                     "start `torchrun ... -m tunelab lora` yourself.", kind=int)
    shard: bool = opt(False, "In several torch processes, split every block's weights (and their adapters and "
                      "optimizer state) over them (FSDP2), for models that do not fit one device; LoRA and DoRA.")
    quantize: int = opt(None, "QLoRA: load the base model's linear layers quantized to this many bits (mlx engine).",
                        kind=int, choices=[4, 8])
    q_group_size: int = opt(64, "Group size of --quantize (values sharing one scale and bias).", choices=[32, 64, 128])


@dataclass
class FuseOptions:
    model: str = opt(DEFAULT_MODEL, "Base model the adapter was trained on.")
    adapter_path: str = opt("adapters", "Adapter folder.")
    save_path: str = opt("fused_model", "Folder to write the merged model into (a new one).")
    overwrite: bool = opt(False, "Replace --save-path when it holds an earlier `tunelab fuse` output.")
    engine: str = opt("auto", "Compute engine: mlx (Apple silicon) or torch (NVIDIA GPUs, CPUs); auto picks mlx on "
                      "Apple silicon when it is installed, torch elsewhere.", choices=["auto", "torch", "mlx"])
    device: str = opt("auto", "Compute device.", choices=["auto", "cpu", "cuda", "mps"])


@dataclass
class GenerateOptions:
    model: str = opt(DEFAULT_MODEL, "Model: repo id, local or fused folder, .gguf file, or 'smollm2'.")
    adapter_path: str = opt(None, "Optional adapter folder to apply.")
    prompt: str = opt("Hello", "Prompt; '-' reads it from standard input.", short="-p")
    system_prompt: str = opt(None, "System message (chat template only).")
    ignore_chat_template: bool = opt(False, "Send the prompt as raw text, without the chat template.")
    max_tokens: int = opt(256, "Maximum tokens to generate.", short="-m")
    temp: float = opt(0.0, "Sampling temperature (0: greedy).")
    top_p: float = opt(1.0, "Nucleus sampling threshold.")
    seed: int = opt(0, "Sampling seed.")
    engine: str = opt("auto", "Compute engine: mlx (Apple silicon) or torch (NVIDIA GPUs, CPUs); auto picks mlx on "
                      "Apple silicon when it is installed, torch elsewhere.", choices=["auto", "torch", "mlx"])
    device: str = opt("auto", "Compute device.", choices=["auto", "cpu", "cuda", "mps"])


@dataclass
class ServeOptions:
    model: str = opt(DEFAULT_MODEL, "Model: repo id, local or fused folder, .gguf file, or 'smollm2'.")
    adapter_path: str = opt(None, "An adapter folder to serve besides the base model, under its folder's name.")
    adapter: list = opt(None, "More adapters: NAME=FOLDER, comma-separated or repeated; a request's `model` "
                        "field picks the base model or one adapter (swapped onto the one loaded base).",
                        kind=list_of_str, metavar="NAME=FOLDER")
    name: str = opt(None, "The base model's name in requests and /v1/models (default: its folder or file name).")
    host: str = opt("127.0.0.1", "Address to listen on (127.0.0.1: this machine only; 0.0.0.0 exposes it, then "
                    "pass --api-key).")
    port: int = opt(8080, "Port to listen on.")
    api_key: str = opt(None, "Require `Authorization: Bearer KEY` on every request but /health.")
    max_tokens: int = opt(512, "Tokens an answer may take when the request does not say (max_tokens).")
    max_batch: int = opt(8, "Requests for the same model generated together as one batch, at most.")
    max_queue: int = opt(64, "Requests waiting or running, at most; more get HTTP 429 with Retry-After.")
    batch_wait: float = opt(0.005, "Seconds to wait for more requests to arrive before a batch starts.")
    log_prompts: bool = opt(False, "Log each request's prompt (by default only sizes and times are logged).")
    engine: str = opt("auto", "Compute engine: mlx (Apple silicon) or torch (NVIDIA GPUs, CPUs); auto picks mlx on "
                      "Apple silicon when it is installed, torch elsewhere.", choices=["auto", "torch", "mlx"])
    device: str = opt("auto", "Compute device.", choices=["auto", "cpu", "cuda", "mps"])
    dtype: str = opt("auto", "Compute dtype.", choices=["auto", "float32", "bfloat16", "float16"])


@dataclass
class EvalOptions:
    model: str = opt(DEFAULT_MODEL, "Base model: repo id, local folder, .gguf file, or 'smollm2'.")
    adapter_path: str = opt(None, "Adapter folder: evaluates base + adapter ('tuned') beside the base model.")
    compare: list = opt(None, "More models to evaluate on the same prompts: fused folders, .gguf files, "
                        "repo ids; NAME=REF sets the label. Comma-separated or repeated.",
                        kind=list_of_str, metavar="REFS")
    predictions: list = opt(None, "JSON Lines files of answers produced elsewhere (LM Studio, Ollama, ...), "
                            "one {\"index\" or \"prompt\", \"answer\"} object a line; NAME=FILE sets the label. "
                            "Comma-separated or repeated.", kind=list_of_str, metavar="FILES")
    no_base: bool = opt(False, "Do not evaluate the base model itself.")
    data: str = opt("data", "Folder with the split to evaluate (test.jsonl by default).")
    split: str = opt("test", "Split to evaluate.", choices=["test", "valid", "train"])
    metric: list = opt(None, "Metrics, comma-separated or repeated: exact, normalized, sql-canonical, "
                       "sql-exec, loss (default: sql-exec,sql-canonical,loss for text-to-SQL data, "
                       "else exact,normalized,loss).", kind=list_of_str, metavar="METRICS")
    num_rows: int = opt(-1, "Evaluate only the first N rows of the split (-1: all).")
    run_dir: str = opt(None, "Run folder for eval/ and report.html (default: the adapter folder, "
                       "else tunelab-eval).")
    batch_size: int = opt(32, "Prompts generated together (rows of similar prompt length).")
    max_tokens: int = opt(128, "Token budget of each answer.", short="-m")
    temp: float = opt(0.0, "Sampling temperature (0: greedy).")
    top_p: float = opt(1.0, "Nucleus sampling threshold.")
    seed: int = opt(0, "Seed for sampling and for sql-exec's random databases.")
    engine: str = opt("auto", "Compute engine: mlx (Apple silicon) or torch (NVIDIA GPUs, CPUs); auto picks mlx on "
                      "Apple silicon when it is installed, torch elsewhere.", choices=["auto", "torch", "mlx"])
    device: str = opt("auto", "Compute device.", choices=["auto", "cpu", "cuda", "mps"])


@dataclass
class ExportOptions:
    model: str = opt(DEFAULT_MODEL, "Model to export (a fused folder, repo id, .gguf file or 'smollm2'); with "
                     "--adapter-path, the base model the adapter was trained on.")
    adapter_path: str = opt(None, "Adapter folder: merged into the model on the way (--to gguf), or the adapter "
                            "to export alone (--to gguf-lora).")
    to: str = opt("gguf", "What to write: gguf (a whole model for llama.cpp, LM Studio, Ollama) or gguf-lora (the "
                  "adapter alone, for llama.cpp --lora and Ollama's ADAPTER).", choices=["gguf", "gguf-lora"])
    outtype: str = opt("f16", "Type of the weight matrices (norms and biases stay f32).",
                       choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"])
    out: str = opt(None, "Output file (default: <model or adapter name>-<outtype>.gguf here).", short="-o")
    name: str = opt(None, "Model name stored in the file (general.name) and used for Ollama (default: the file's).")
    overwrite: bool = opt(False, "Replace existing output files (and an LM Studio copy).")
    lmstudio: str = opt(None, "Also place the file in LM Studio's models folder as PUBLISHER/MODEL ($LMSTUDIO_MODELS_DIR "
                        "or ~/.lmstudio/models); without a value: tunelab/<file name>.", const="",
                        metavar="NAME")
    ollama: bool = opt(False, "Also write an Ollama Modelfile beside the file and print the `ollama create` command.")
    system_prompt: str = opt(None, "SYSTEM of the Modelfile (default: the system message of every training row, "
                             "when they share one; else the chat template's own default).")


@dataclass
class DataCheckOptions:
    data: str = opt("data", "Folder with train.jsonl, valid.jsonl and/or test.jsonl.")
    model: str = opt(DEFAULT_MODEL, "Model whose tokenizer and chat template render the rows (weights are not loaded).")
    mask_prompt: bool = opt(False, "Check the masks `lora --mask-prompt` uses (answers only).")
    train_on: str = opt("all", "With --mask-prompt, which assistant turns of multi-turn rows are trained.",
                        choices=["all", "last"])
    max_seq_length: int = opt(2048, "The limit `lora` will apply; longer rows are counted.")
    long_rows: str = opt("truncate", "What `lora` will do with longer rows.", choices=["truncate", "drop"])
    chat_template: str = opt(None, "Chat template for a model without one: 'chatml' or a Jinja file.")


@dataclass
class DemoOptions:
    out: str = opt("tunelab-demo", "Folder for the demo's data, adapter and fused model.")
    model: str = opt(DEFAULT_MODEL, "Model to fine-tune.")
    iters: int = opt(300, "Training steps.")
    learning_rate: float = opt(1e-4, "Peak learning rate (10% warm-up, then cosine decay to a tenth of it).")
    num_layers: int = opt(-1, "Number of final layers to train (-1: every block, the recommended recipe; 4: the "
                          "tutorial's).")
    max_tokens: int = opt(128, "Token budget of each generated answer (the example and the evaluation).")
    seed: int = opt(0, "Seed for data and training.")
    engine: str = opt("auto", "Compute engine: mlx (Apple silicon) or torch (NVIDIA GPUs, CPUs); auto picks mlx on "
                      "Apple silicon when it is installed, torch elsewhere.", choices=["auto", "torch", "mlx"])


COMMAND_OPTIONS = {
    "prepare": PrepareOptions,
    "lora": LoraOptions,
    "fuse": FuseOptions,
    "generate": GenerateOptions,
    "serve": ServeOptions,
    "eval": EvalOptions,
    "export": ExportOptions,
    "data check": DataCheckOptions,
    "demo": DemoOptions,
}

# mlx-lm config files nest LoRA settings; they map onto the flat fields above.
_NESTED_KEYS = {"lora_parameters": {"rank": "lora_rank", "scale": "lora_scale",
                                    "dropout": "lora_dropout", "keys": "lora_keys"}}


def add_arguments(parser, options_cls):
    """Add one flag per field of `options_cls`; every default is 'not given'."""
    for f in dataclasses.fields(options_cls):
        meta = f.metadata
        flags = ["--" + f.name.replace("_", "-")] + ([meta["short"]] if meta["short"] else [])
        help_text = meta["help"] if f.default is None or "(default" in meta["help"] \
            else f"{meta['help']} (default: {f.default!r})"
        help_text = help_text.replace("%", "%%")
        if meta["kind"] is bool:   # a default of None: --x and --no-x, and "not given" stays None
            action = "store_true" if f.default is not None else argparse.BooleanOptionalAction
            parser.add_argument(*flags, dest=f.name, action=action, default=argparse.SUPPRESS, help=meta["help"])
        elif meta["kind"] is list_of_str:  # `--x a,b` and `--x a --x b` both give [a, b]
            parser.add_argument(*flags, dest=f.name, type=meta["kind"], action="extend",
                                metavar=meta["metavar"], default=argparse.SUPPRESS, help=help_text)
        elif meta["const"] is not None:
            parser.add_argument(*flags, dest=f.name, type=meta["kind"], nargs="?", const=meta["const"],
                                metavar=meta["metavar"], default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(*flags, dest=f.name, type=meta["kind"], choices=meta["choices"],
                                metavar=meta["metavar"], default=argparse.SUPPRESS, help=help_text)
    parser.add_argument("-c", "--config", dest="config", default=None, metavar="FILE",
                        help="YAML file of options (keys as the flags, with - or _); flags override it.")


def _coerce(name, value, f, where):
    """Check a config-file value against the field's type; return (value, problem)."""
    kind = f.metadata["kind"]
    if value is None:
        return None, None
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is list_of_str:
        if isinstance(value, str):
            value = list_of_str(value)
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif kind is schedule:
        ok = isinstance(value, (str, dict))
    elif kind is mapping:
        ok = isinstance(value, dict)
    elif kind is size:
        try:
            value, ok = size(value), True
        except argparse.ArgumentTypeError:
            ok = False
    elif kind is mappings:
        ok = isinstance(value, (dict, list))
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = getattr(kind, "__name__", "value").replace("list_of_str", "list of strings").replace(
            "schedule", "a schedule name or mapping").replace("mappings", "a mapping or a list of them").replace(
            "mapping", "a mapping").replace("size", "a size such as 2GB")
        expected = "finite float" if kind is float and isinstance(value, float) else expected
        return None, f"{where}: {name}: expected {expected}, got {value!r}"
    choices = f.metadata["choices"]
    if choices and value not in choices:
        return None, f"{where}: {name}: {value!r} is not one of {', '.join(choices)}"
    return value, None


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, reading `1e-5` as a float the way mlx-lm's config loader does (YAML 1.1 alone
    wants `1.0e-5`), so a config file that mlx-lm accepts means the same numbers here."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))

_YAML_TYPES = {"list": "a list", "str": "a single value", "int": "a number", "float": "a number",
               "bool": "true or false"}


def _load_yaml(path):
    """The parsed YAML of a config file; UserError (with the line where one applies) when it is not a
    readable UTF-8 YAML mapping."""
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a config file: give the path of a YAML file")
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    text = utf8_text(path)
    try:
        data = yaml.load(text, Loader=_ConfigLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        column = f" at column {mark.column + 1}" if mark else ""
        raise UserError(f"{where}: not valid YAML ({e.problem or e.context}{column}): "
                        "write one `option: value` a line") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e}): write one `option: value` a line") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to read: options are a flat mapping of `option: value` "
                        "lines (lora_parameters one level below)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        got = _YAML_TYPES.get(type(data).__name__, type(data).__name__)
        raise UserError(f"{path}: expected a mapping of option names to values (`option: value` lines), "
                        f"got {got}")
    return data


def read_config_file(path, options_cls):
    """Read a YAML options file into {field: value}; raise UserError listing every bad key."""
    path = Path(path)
    raw = _load_yaml(path)
    by_name = {f.name: f for f in dataclasses.fields(options_cls)}
    values, problems = {}, []
    flat = []
    for key, value in raw.items():
        key = str(key).replace("-", "_")
        if key in _NESTED_KEYS and isinstance(value, dict):
            for sub, sub_value in value.items():
                target = _NESTED_KEYS[key].get(sub)
                if target is None:
                    problems.append(f"{path}: {key}.{sub}: unknown option")
                else:
                    flat.append((target, sub_value, f"{key}.{sub}"))
        elif key in _NESTED_KEYS:
            problems.append(f"{path}: {key}: expected a mapping of {', '.join(_NESTED_KEYS[key])}, got {value!r}")
        else:
            flat.append((key, value, key))
    for name, value, shown in flat:
        if name not in by_name:
            problems.append(f"{path}: {shown}: unknown option (valid: {', '.join(sorted(by_name))})")
            continue
        value, problem = _coerce(shown, value, by_name[name], str(path))
        if problem:
            problems.append(problem)
        else:
            values[name] = value
    UserError.raise_if(problems)
    return values


def resolve(options_cls, namespace):
    """Merge defaults < config file < command line into an `options_cls` instance."""
    given = {k: v for k, v in vars(namespace).items() if k not in ("command", "action", "config")}
    values = read_config_file(namespace.config, options_cls) if namespace.config else {}
    values.update(given)
    return options_cls(**values)
