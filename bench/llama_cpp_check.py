"""Exported GGUF files in llama.cpp itself (through llama-cpp-python), side by side with tunelab.

For each outtype, the model is exported with `tunelab export`, loaded by llama.cpp, and for every
prompt: llama.cpp's tokens of the chat-templated prompt are compared with tunelab's, then both
generate greedily and the answers are compared token for token, including where each stops
(the end-of-turn token). Kept out of the test suite: llama-cpp-python builds from source
(about 25 minutes on 2 cores): `pip install llama-cpp-python`.

    python bench/llama_cpp_check.py --model smollm2 --outtypes f32,f16,q8_0
    python bench/llama_cpp_check.py --model tunelab-demo/fused_model --data tunelab-demo/data
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

GENERAL_PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.",
                   "Count from 1 to 12, separated by commas."]


def prompts_from(data_dir, n):
    """The first n test rows' prompt messages (system + user), or general questions."""
    if not data_dir:
        return [[{"role": "user", "content": p}] for p in GENERAL_PROMPTS]
    lines = (Path(data_dir) / "test.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line)["messages"][:-1] for line in lines]


def margin(engine, model, ids):
    """Difference of the two largest next-token logits after `ids` (small: a near-tie)."""
    import numpy as np

    top = np.sort(engine.logits(model, np.array([ids]))[0, -1])[-2:]
    return float(top[1] - top[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default=None, help="data folder whose test.jsonl prompts to use")
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--outtypes", default="f32,f16,q8_0")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from llama_cpp import Llama

    from tunelab import engines
    from tunelab.config import ExportOptions
    from tunelab.data.templates import end_of_turn_ids, prompt_tokens
    from tunelab.export import export

    engine, model, _ = engines.load(args.model, log=lambda *_: None)
    tokenizer = model.tokenizer
    stop_ids = end_of_turn_ids(tokenizer)
    conversations = prompts_from(args.data, args.rows)
    ours = []
    for messages in conversations:
        ids = prompt_tokens(tokenizer, messages)
        ours.append((ids, list(engine.generate(model, ids, max_tokens=args.max_tokens, stop_ids=stop_ids))))

    print(f"model {args.model}; {len(conversations)} prompts; greedy, at most {args.max_tokens} tokens")
    print(f"{'outtype':8} {'prompt tokens equal':>20} {'answers equal':>14} {'stopped at EOT (ours/llama.cpp)':>32} {'s':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.outtypes.split(","):
            path = Path(tmp) / f"m-{outtype}.gguf"
            export(ExportOptions(model=args.model, outtype=outtype, out=str(path)), log=lambda *_: None)
            started = time.perf_counter()
            llm = Llama(model_path=str(path), n_ctx=1024, n_threads=2, verbose=False)
            same_prompt = same_answer = ours_stopped = theirs_stopped = 0
            for messages, (ids, answer) in zip(conversations, ours):
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                theirs_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
                same_prompt += theirs_ids == ids
                llm.reset()
                theirs = []
                for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
                    if token in stop_ids:
                        theirs_stopped += 1
                        break
                    theirs.append(token)
                    if len(theirs) == args.max_tokens:
                        break
                ours_stopped += len(answer) < args.max_tokens
                same_answer += theirs == answer
                if theirs != answer:
                    at = next(i for i in range(min(len(theirs), len(answer)) + 1)
                              if i == min(len(theirs), len(answer)) or theirs[i] != answer[i])
                    print(f"  differs at answer token {at} (tunelab's top-2 logit margin there: "
                          f"{margin(engine, model, ids + answer[:at]):.4f}):\n    tunelab   "
                          f"{tokenizer.decode(answer)!r}\n    llama.cpp {tokenizer.decode(theirs)!r}")
            n = len(conversations)
            print(f"{outtype:8} {same_prompt:>16}/{n:<3} {same_answer:>10}/{n:<3} {ours_stopped:>22}/{theirs_stopped:<9}"
                  f" {time.perf_counter() - started:6.1f}")
            del llm
    return 0


if __name__ == "__main__":
    sys.exit(main())
