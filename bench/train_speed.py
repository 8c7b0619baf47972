"""Training speed side by side: tunelab against Hugging Face TRL (SFTTrainer + PEFT), same work.

Workloads, both on chat text-to-SQL rows from builtin:sql and the embedded SmolLM2-135M-Instruct,
LoRA rank 8 (scale 20) on every linear layer, loss on the answers only, Adam at 1e-4, fp32, CPU:
  W1, the tutorial's: 100 training rows, the last 4 blocks, batch 1 (1000 iterations = 10 epochs);
  W2, a general one: 1000 training rows, all blocks, batch 4 (250 iterations = 1 epoch). Each tool runs in its
own process (so peak memory is its own), and the tools alternate over --rounds so that drift of
the machine hits both alike.

    pip install trl                      # TRL's SFTTrainer, with accelerate
    python bench/train_speed.py --iters 200 --rounds 2

Reported per run: seconds per iteration and real (non-padding) tokens per second over the
training steps, supervised tokens per second, peak resident memory of the process, and the
training loss at fixed iterations (mean of each 10-step window).
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
                     steps_per_eval=iters, save_every=iters, val_batches=1, adapter_path=str(run)),
         log=lambda *_: None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().split("\n") if line]
    train = [r for r in records if "train_loss" in r]
    step_seconds = sum(10 / r["iterations_per_s"] for r in train)
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
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if LAYERS == -1 else list(range(n_layers - LAYERS, n_layers))
    peft_config = LoraConfig(r=RANK, lora_alpha=SCALE * RANK, lora_dropout=0.0, target_modules=LINEAR,
                             layers_to_transform=layers, task_type="CAUSAL_LM")
    step_times, losses = [], {}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

    config = SFTConfig(output_dir=str(Path(out).parent / "trl-run"), per_device_train_batch_size=BATCH, max_steps=iters,
                       learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                       optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, logging_steps=10, save_strategy="no",
                       report_to=[], use_cpu=True, bf16=False, fp16=False, completion_only_loss=True,
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


def run_trl_defaults(model_dir, folder, iters, out):
    global GRADIENT_CHECKPOINTING
    GRADIENT_CHECKPOINTING = True
    return run_trl(model_dir, folder, iters, out)


RUNNERS = {"tunelab": run_tunelab, "trl": run_trl, "trl-defaults": run_trl_defaults}


def use_workload(name):
    global LAYERS, BATCH
    LAYERS, BATCH = WORKLOADS[name]["layers"], WORKLOADS[name]["batch"]


def child(args):
    from tunelab import models

    use_workload(args.workload)
    model_dir = models.resolve("smollm2", log=lambda *_: None)
    result = RUNNERS[args.run](model_dir, args.data, args.iters, args.out)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    Path(args.out).write_text(json.dumps(result))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=list(WORKLOADS), default="W1")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tools", default="tunelab,trl",
                        help="comma-separated: tunelab, trl, trl-defaults (TRL with its gradient checkpointing on)")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        return child(args)

    from tunelab import models

    use_workload(args.workload)
    tmp = Path(tempfile.mkdtemp(prefix="tunelab-bench-"))
    prepare_data(tmp / "data", WORKLOADS[args.workload]["rows"])
    model_dir = models.resolve("smollm2", log=lambda *_: None)
    lengths, supervised = token_counts(model_dir, tmp / "data")
    # Rows are visited once per epoch in some order; over whole epochs the token count is exact.
    per_step = BATCH * statistics.mean(lengths), BATCH * statistics.mean(supervised)
    results = {tool: [] for tool in args.tools.split(",")}
    for round_no in range(args.rounds):
        for tool in results:
            out = tmp / f"{tool}-{round_no}.json"
            subprocess.run([sys.executable, __file__, "--run", tool, "--workload", args.workload, "--data",
                            str(tmp / "data"), "--iters", str(args.iters), "--out", str(out)], check=True)
            results[tool].append(json.loads(out.read_text()))
            r = results[tool][-1]
            print(f"round {round_no + 1} {tool}: {r['train_seconds'] / args.iters:.3f} s/it, "
                  f"peak {r['peak_rss_gb']:.2f} GB", flush=True)

    print(f"\n{args.workload}: {args.iters} iterations x {args.rounds} rounds, batch {BATCH}; "
          f"{statistics.mean(lengths):.1f} tokens a row on average, {statistics.mean(supervised):.1f} supervised")
    print(f"{'tool':10}{'s/it':>8}{'tokens/s':>10}{'superv. tok/s':>15}{'peak GB':>9}  loss at steps "
          + " ".join(str(s) for s in (10, args.iters // 2, args.iters)))
    for tool, runs in results.items():
        seconds = statistics.median(r["train_seconds"] / args.iters for r in runs)
        tokens = BATCH * runs[0]["tokens_per_row"] if runs[0].get("tokens_per_row") else per_step[0]
        sup = BATCH * runs[0]["supervised_per_row"] if runs[0].get("supervised_per_row") else per_step[1]
        losses = runs[0]["losses"]
        shown = " ".join(f"{losses.get(str(s), losses.get(s, float('nan'))):.3f}" for s in (10, args.iters // 2, args.iters))
        print(f"{tool:10}{seconds:8.3f}{tokens / seconds:10.0f}{sup / seconds:15.1f}"
              f"{max(r['peak_rss_gb'] for r in runs):9.2f}  {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
