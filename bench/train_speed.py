"""Training speed side by side: tunelab against Hugging Face TRL (SFTTrainer + PEFT), same work.

Workloads, both on chat text-to-SQL rows from builtin:sql and the embedded SmolLM2-135M-Instruct,
LoRA rank 8 (scale 20) on every linear layer, loss on the answers only, Adam at 1e-4, fp32, CPU:
  W1, the tutorial's: 100 training rows, the last 4 blocks, batch 1 (1000 iterations = 10 epochs);
  W2, a general one: 1000 training rows, all blocks, batch 4 (250 iterations = 1 epoch). Each tool runs in its
own process (so peak memory is its own), and the tools alternate over --rounds so that drift of
the machine hits both alike.

    pip install trl                      # TRL's SFTTrainer, with accelerate
    python bench/train_speed.py --iters 200 --rounds 2
    python bench/train_speed.py --workload W2 --model qwen2.5-0.5b-shape --device cuda --dtype bfloat16

`--model qwen2.5-0.5b-shape` is a randomly initialised model with Qwen2.5-0.5B's shape (24 blocks,
hidden 896, 151,936-token vocabulary, tied embeddings) and SmolLM2's tokenizer (the rows' token ids
all fall inside the larger vocabulary): the speed of a step depends on the shape, not the weights.

Reported per run: seconds per iteration and real (non-padding) tokens per second over the
training steps, supervised tokens per second, peak resident memory of the process, and the
training loss at fixed iterations (mean of each 10-step window), and the effective model FLOP/s
as a fraction of the machine's measured matrix-product peak (formula in `model_flops`).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANK, SCALE, LR = 8, 20.0, 1e-4
WORKLOADS = {"W1": {"rows": 150, "layers": 4, "batch": 1}, "W2": {"rows": 1050, "layers": -1, "batch": 4}}
LAYERS, BATCH = 4, 1     # set from --workload
DEVICE, DTYPE = "cpu", "float32"   # set from --device / --dtype
QWEN_SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
# TRL turns gradient checkpointing on by default, which recomputes the forward pass and makes the
# input embeddings require grad (so backward runs through every block). Off gives TRL its best time
# here, where memory is plentiful; --trl-defaults measures it as it comes.
GRADIENT_CHECKPOINTING = False
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prepare_data(folder, num_rows):
    from tunelab.config import PrepareOptions
    from tunelab.data.prepare import prepare

    prepare(PrepareOptions(source="builtin:sql", out=str(folder), num_rows=num_rows), log=lambda *_: None)


def rows(folder):
    return [json.loads(line) for line in (Path(folder) / "train.jsonl").read_text().split("\n") if line]


def token_counts(model_dir, folder):
    """(real tokens, supervised tokens) of each training row, as tunelab renders it (the same text TRL trains on)."""
    from transformers import AutoTokenizer

    from tunelab.data.templates import encode_row

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    examples = [encode_row(tokenizer, r, "chat", mask_prompt=True) for r in rows(folder)]
    return [len(e.tokens) for e in examples], [int(e.supervised.sum()) for e in examples]


def run_tunelab(model_dir, folder, iters, out):
    from tunelab.config import LoraOptions
    from tunelab.train import lora

    run = Path(out).parent / "tunelab-run"
    started = time.perf_counter()
    lora(LoraOptions(model=str(model_dir), data=str(folder), train=True, iters=iters, batch_size=BATCH,
                     num_layers=LAYERS, mask_prompt=True, learning_rate=LR, steps_per_report=10,
                     steps_per_eval=iters, save_every=iters, val_batches=1, adapter_path=str(run),
                     device=DEVICE, dtype=DTYPE),
         log=lambda *_: None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().split("\n") if line]
    train = [r for r in records if "train_loss" in r]
    steps = [0] + [r["step"] for r in train]       # each record covers the steps since the one before
    step_seconds = sum((steps[k + 1] - steps[k]) / r["iterations_per_s"] for k, r in enumerate(train))
    return {"losses": {r["step"]: r["train_loss"] for r in train}, "train_seconds": step_seconds,
            "wall_seconds": time.perf_counter() - started}


def run_trl(model_dir, folder, iters, out):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows(folder)])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, DTYPE))
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if LAYERS == -1 else list(range(n_layers - LAYERS, n_layers))
    peft_config = LoraConfig(r=RANK, lora_alpha=SCALE * RANK, lora_dropout=0.0, target_modules=LINEAR,
                             layers_to_transform=layers, task_type="CAUSAL_LM")
    step_times, losses = [], {}
    sync = torch.cuda.synchronize if DEVICE == "cuda" else lambda: None   # time the GPU's work, not its queueing

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            step_times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]


    config = SFTConfig(output_dir=str(Path(out).parent / "trl-run"), per_device_train_batch_size=BATCH, max_steps=iters,
                       learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                       optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, logging_steps=10, save_strategy="no",
                       report_to=[], use_cpu=DEVICE == "cpu", bf16=DTYPE == "bfloat16", fp16=False, completion_only_loss=True,
                       dataloader_num_workers=0, seed=0, max_length=2048,
                       gradient_checkpointing=GRADIENT_CHECKPOINTING)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, peft_config=peft_config,
                         processing_class=AutoTokenizer.from_pretrained(str(model_dir)), callbacks=[Timer()])
    started = time.perf_counter()
    trainer.train()
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    masks = trainer.train_dataset["completion_mask"] if "completion_mask" in trainer.train_dataset.column_names else []
    return {"losses": losses, "train_seconds": sum(step_times), "wall_seconds": time.perf_counter() - started,
            "tokens_per_row": statistics.mean(lengths),
            "supervised_per_row": statistics.mean(sum(m) for m in masks) if masks else None}


def run_tunelab_eager(model_dir, folder, iters, out):
    """tunelab with its CUDA graphs off (each step's kernels launched one by one); on a CPU the same as tunelab."""
    import os

    os.environ["TUNELAB_CUDA_GRAPHS"] = "0"
    return run_tunelab(model_dir, folder, iters, out)


def run_trl_defaults(model_dir, folder, iters, out):
    global GRADIENT_CHECKPOINTING
    GRADIENT_CHECKPOINTING = True
    return run_trl(model_dir, folder, iters, out)


def run_mlx_lm(model_dir, folder, iters, out):
    """mlx-lm's own `mlx_lm.lora` (its main, its trainer), with a callback that records each step."""
    import shutil

    import mlx_lm.lora

    iters = MLX_ITERS
    data = Path(out).parent / "mlx-data"          # mlx-lm reads train.jsonl and valid.jsonl
    data.mkdir(exist_ok=True)
    for split in ("train", "valid"):
        shutil.copy(Path(folder) / f"{split}.jsonl", data / f"{split}.jsonl")
    config = Path(out).parent / "mlx-lora.yaml"
    config.write_text(f"lora_parameters: {{rank: {RANK}, scale: {SCALE}, dropout: 0.0}}\n")
    reports = []

    class Recorder(mlx_lm.lora.TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info)

    # mlx_lm.lora.run builds its callback from --report-to; hand it ours instead
    mlx_lm.lora.get_reporting_callbacks = lambda *a, **k: Recorder()
    sys.argv = ["mlx_lm.lora", "--train", "--model", str(model_dir), "--data", str(data), "--batch-size", str(BATCH),
                "--num-layers", str(LAYERS), "--iters", str(iters), "--mask-prompt", "--learning-rate", str(LR),
                "--steps-per-report", "1", "--steps-per-eval", str(iters * 10), "--val-batches", "1",
                "--save-every", str(iters * 10), "-c", str(config), "--adapter-path", str(Path(out).parent / "mlx-run")]
    started = time.perf_counter()
    mlx_lm.lora.main()
    return {"losses": {r["iteration"]: r["train_loss"] for r in reports},
            "train_seconds": sum(1 / r["iterations_per_second"] for r in reports), "iterations": len(reports),
            "wall_seconds": time.perf_counter() - started, "peak_mlx_gb": max(r["peak_memory"] for r in reports)}


MLX_ITERS = 5   # set from --mlx-iters: mlx[cpu] on Linux takes tens of seconds a step
RUNNERS = {"tunelab": run_tunelab, "tunelab-eager": run_tunelab_eager, "trl": run_trl, "trl-defaults": run_trl_defaults, "mlx-lm": run_mlx_lm}


def use_workload(args):
    global LAYERS, BATCH, DEVICE, DTYPE, MLX_ITERS
    LAYERS, BATCH = WORKLOADS[args.workload]["layers"], WORKLOADS[args.workload]["batch"]
    DEVICE, DTYPE, MLX_ITERS = args.device, args.dtype, args.mlx_iters


def build_model(args, folder):
    """The model folder the tools train: the embedded SmolLM2, or a random model of Qwen2.5-0.5B's shape."""
    from tunelab import models

    if args.model == "smollm2":
        return models.resolve("smollm2", log=lambda *_: None)
    tokenizer = Path(args.tokenizer) if args.tokenizer else models.resolve("smollm2", log=lambda *_: None)
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(**QWEN_SHAPE)
    config.rope_parameters = {"rope_type": "default", "rope_theta": QWEN_SHAPE["rope_theta"]}
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(str(folder))
    if (tokenizer / "chat_template.jinja").is_file():
        shutil.copy(tokenizer / "chat_template.jinja", folder / "chat_template.jinja")
    return folder


def model_flops(config, tokens):
    """FLOPs of one training step as the plain computation does it, for `tokens` real tokens.

    Forward: 2 x (linear weights of every block + output projection) per token. Backward: the input
    gradients through the output projection and every block from the lowest adapted one up, again
    2 x weights per token (frozen weights need no weight gradient; LoRA's own products, attention
    scores and element-wise work are left out: under 3% of either here).
    """
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    block = h * h * 2 + h * kv * 2 + 3 * h * i
    head = config["vocab_size"] * h
    trained = n if LAYERS == -1 else LAYERS
    return tokens * (2 * (n * block + head) + 2 * (trained * block + head))


def matmul_peak(device, dtype, size=2048, repeats=10):
    """Best FLOP/s of a size x size x size matrix product on the device, in the dtype."""
    import torch

    a = torch.randn(size, size, device=device).to(getattr(torch, dtype))
    b = torch.randn(size, size, device=device).to(getattr(torch, dtype))
    best = float("inf")
    for _ in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def child(args):
    use_workload(args)
    result = RUNNERS[args.run](Path(args.model_dir), args.data, args.iters, args.out)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    if DEVICE == "cuda":
        import torch

        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    Path(args.out).write_text(json.dumps(result))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=list(WORKLOADS), default="W1")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", choices=["smollm2", "qwen2.5-0.5b-shape"], default="smollm2")
    parser.add_argument("--tokenizer", help="tokenizer folder for qwen2.5-0.5b-shape (default: the embedded SmolLM2's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--tools", default="tunelab,trl",
                        help="comma-separated: tunelab, tunelab-eager (CUDA graphs off), trl, trl-defaults (TRL with "
                             "its gradient checkpointing on), "
                             "mlx-lm (mlx_lm lora; on Linux its CPU build, --mlx-iters steps only)")
    parser.add_argument("--mlx-iters", type=int, default=5, help="iterations for mlx-lm (default 5)")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        return child(args)

    from tunelab import models

    use_workload(args)
    tmp = Path(tempfile.mkdtemp(prefix="tunelab-bench-"))
    prepare_data(tmp / "data", WORKLOADS[args.workload]["rows"])
    model_dir = build_model(args, tmp / "model")
    lengths, supervised = token_counts(model_dir, tmp / "data")
    config = models.read_config(model_dir)
    # Rows are visited once per epoch in some order; over whole epochs the token count is exact.
    per_step = BATCH * statistics.mean(lengths), BATCH * statistics.mean(supervised)
    results = {tool: [] for tool in args.tools.split(",")}
    for round_no in range(args.rounds):
        for tool in results:
            out = tmp / f"{tool}-{round_no}.json"
            done = subprocess.run([sys.executable, __file__, "--run", tool, "--workload", args.workload,
                                   "--data", str(tmp / "data"), "--iters", str(args.iters), "--out", str(out),
                                   "--model-dir", str(model_dir), "--device", args.device, "--dtype", args.dtype,
                                   "--mlx-iters", str(args.mlx_iters)])
            if done.returncode != 0:
                print(f"round {round_no + 1} {tool}: FAILED (exit {done.returncode})", flush=True)
                continue
            results[tool].append(json.loads(out.read_text()))
            r = results[tool][-1]
            print(f"round {round_no + 1} {tool}: {r['train_seconds'] / r.get('iterations', args.iters):.3f} s/it, "
                  f"peak {r.get('peak_gpu_gb', r['peak_rss_gb']):.2f} GB", flush=True)

    peak = matmul_peak(args.device, args.dtype)
    flops = model_flops(config, per_step[0])
    memory = "GPU memory" if args.device == "cuda" else "peak RSS"
    print(f"\n{args.workload} on {args.model}, {args.device} {args.dtype}: {args.iters} iterations x {args.rounds} "
          f"rounds, batch {BATCH}; {statistics.mean(lengths):.1f} tokens a row on average, "
          f"{statistics.mean(supervised):.1f} supervised")
    print(f"model FLOPs a step {flops / 1e9:.1f} G; measured matrix-product peak {peak / 1e12:.2f} TFLOP/s "
          f"({args.dtype}, 2048^3)")
    marks = (10, args.iters // 20 * 10, args.iters)      # losses are logged every 10 steps
    print(f"{'tool':10}{'s/it':>8}{'tokens/s':>10}{'superv. tok/s':>15}{memory:>12}{'of peak':>9}  loss at steps "
          + " ".join(str(s) for s in marks))
    for tool, runs in results.items():
        if not runs:
            continue
        seconds = statistics.median(r["train_seconds"] / r.get("iterations", args.iters) for r in runs)
        tokens = BATCH * runs[0]["tokens_per_row"] if runs[0].get("tokens_per_row") else per_step[0]
        sup = BATCH * runs[0]["supervised_per_row"] if runs[0].get("supervised_per_row") else per_step[1]
        losses = runs[0]["losses"]
        shown = " ".join(f"{losses.get(str(s), losses.get(s, float('nan'))):.3f}" for s in marks)
        used = max(r.get("peak_gpu_gb", r["peak_rss_gb"]) for r in runs)
        print(f"{tool:10}{seconds:8.3f}{tokens / seconds:10.0f}{sup / seconds:15.1f}{used:10.2f} GB"
              f"{flops / seconds / peak:9.1%}  {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
