"""Training tokens/s in one process and in N processes (torchrun, gloo on CPUs or NCCL on GPUs), same work.

The work is W2's (see train_speed.py): builtin:sql chat rows, the embedded SmolLM2-135M-Instruct, LoRA rank 8
on every linear layer of every block, loss on the answers, global batch 4, Adam at 1e-4. Each setting runs
`tunelab lora --train` (with --nproc N for N processes) and reads the tokens/s rank 0 logged in
metrics.jsonl (real tokens of the global batches over the training time; the first report window, with
the first steps' warm-up, is left out).

    python bench/ddp_speed.py --nproc 1,2 --iters 60 --dtype float32
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", default="1,2")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rows", type=int, default=1050)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data"
        subprocess.run([sys.executable, "-m", "tunelab", "prepare", "--source", "builtin:sql", "--out", str(data),
                        "--num-rows", str(args.rows)], check=True, capture_output=True)
        results = {}
        for count in (int(n) for n in args.nproc.split(",")):
            run = Path(folder) / f"run-{count}"
            command = [sys.executable, "-m", "tunelab", "lora", "--train", "--model", "smollm2", "--data", str(data),
                       "--num-layers", "-1", "--batch-size", "4", "--iters", str(args.iters), "--mask-prompt",
                       "--learning-rate", "1e-4", "--steps-per-report", "10", "--steps-per-eval", "100000",
                       "--val-batches", "1", "--save-every", "100000", "--dtype", args.dtype, "--engine", "torch",
                       "--adapter-path", str(run)]
            if count > 1:
                command += ["--nproc", str(count)]
            subprocess.run(command, check=True, capture_output=True)
            lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            rates = [x["tokens_per_s"] for x in lines if "tokens_per_s" in x][1:]
            losses = [round(x["train_loss"], 4) for x in lines if "train_loss" in x]
            results[count] = statistics.median(rates)
            print(json.dumps({"processes": count, "tokens_per_s": round(results[count], 1), "train_losses": losses}),
                  flush=True)
        base = results.get(1)
        for count, rate in results.items():
            if base and count > 1:
                print(json.dumps({"processes": count, "speedup": round(rate / base, 2),
                                  "scaling_efficiency": round(rate / base / count, 2)}))


if __name__ == "__main__":
    main()
