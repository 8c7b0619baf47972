"""report.html: one self-contained page (inline CSS, plots as embedded PNG) a person opens in a browser.

It shows the metrics of every evaluated model with 95% intervals, the accuracy per model as a
chart, the training and validation loss curves of the run (metrics.jsonl), and the rows where
two models disagree (base and tuned when both were evaluated), side by side with verdicts.
"""

import base64
import html
import io

MAX_EXAMPLES = 40

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ci { color: #777; font-size: 0.85em; } .meta { color: #555; }
pre { white-space: pre-wrap; margin: 0; font: 13px/1.35 ui-monospace, monospace; }
.ok { color: #176f2c; font-weight: 600; } .bad { color: #b3261e; font-weight: 600; }
.example { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 0.8em; margin: 1em 0; }
img { max-width: 100%; }
"""


def _png(fig):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figures():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves_png(curves):
    """Training and validation loss against step, or None when the run logged neither."""
    train = [(r["step"], r["train_loss"]) for r in curves if "train_loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in curves if "val_loss" in r]
    if not train and not valid:
        return None
    plt = _figures()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if train:
        ax.plot(*zip(*train), label="training loss", color="#1f77b4")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss", color="#d62728")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean cross-entropy per supervised token)")
    ax.grid(alpha=0.3)
    ax.legend()
    image = _png(fig)
    plt.close(fig)
    return image


def accuracy_png(results):
    """Accuracy per model and metric with 95% interval bars, or None without answer metrics."""
    names = [m for m in results["metrics"] if m != "loss"]
    labels = list(results["models"])
    if not names:
        return None
    plt = _figures()
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(names) * len(labels)))
    y = 0
    ticks = []
    for name in names:
        for label in labels:
            entry = results["models"][label]["metrics"][name]
            low, high = entry["ci95"]
            ax.barh(y, 100 * entry["value"], color="#4c72b0" if label != "base" else "#999999")
            ax.errorbar(100 * entry["value"], y, xerr=[[100 * (entry["value"] - low)], [100 * (high - entry["value"])]],
                        color="black", capsize=3)
            ticks.append((y, f"{label} · {name}"))
            y += 1
        y += 0.5
    ax.set_yticks([t for t, _ in ticks], [text for _, text in ticks])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of rows correct (bars: 95% interval)")
    ax.grid(axis="x", alpha=0.3)
    image = _png(fig)
    plt.close(fig)
    return image


def _metric_cell(entry):
    if entry is None:
        return "<td class=num>-</td>"
    low, high = entry["ci95"]
    if "correct" in entry:
        return (f"<td class=num>{100 * entry['value']:.1f}% <span class=ci>({entry['correct']}/{entry['total']}; "
                f"{100 * low:.1f}–{100 * high:.1f})</span></td>")
    return f"<td class=num>{entry['value']:.4g} <span class=ci>({low:.4g}–{high:.4g})</span></td>"


def metrics_table(results):
    columns = [m for m in results["metrics"] if m != "loss"] + (["loss", "ppl"] if "loss" in results["metrics"] else [])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for label, model in results["models"].items():
        what = html.escape(model["reference"] + (f" + adapter {model['adapter']}" if model.get("adapter") else ""))
        cells = "".join(_metric_cell(model["metrics"].get(c)) for c in columns)
        seconds = f"{model['seconds']:.0f} s" if "seconds" in model else "file"
        rows.append(f"<tr><th>{html.escape(label)}</th><td>{what}</td>{cells}<td class=num>{seconds}</td></tr>")
    return (f"<table id=metrics><tr><th>model</th><th>what</th>{head}<th>time</th></tr>\n" + "\n".join(rows)
            + "</table><p class=meta>Accuracy: share of rows correct (count; 95% Wilson interval). Loss: mean "
              "cross-entropy per token of the gold answer (95% bootstrap interval over rows); ppl = exp(loss).</p>")


def _verdict(verdict):
    mark = '<span class=ok>✓</span>' if verdict["correct"] else '<span class=bad>✗</span>'
    note = f" <span class=ci>{html.escape(verdict['note'])}</span>" if verdict["note"] else ""
    return mark + note


def _example(sample, labels, metric_names):
    prompt = "\n\n".join(f"[{m['role']}] {m['content']}" for m in sample["prompt"])
    rows = []
    for label in labels:
        answer = sample["answers"][label]
        verdicts = "<br>".join(f"{html.escape(m)}: {_verdict(sample['verdicts'][label][m])}" for m in metric_names)
        rows.append(f"<tr><th>{html.escape(label)}</th><td><pre>{html.escape(answer if answer is not None else '(no answer)')}"
                    f"</pre></td><td>{verdicts}</td></tr>")
    question = next((m["content"] for m in reversed(sample["prompt"]) if m["role"] == "user"), "")
    return (f"<div class=example><p class=meta>row {sample['index']}</p><p>{html.escape(question)}</p>"
            f"<details><summary>whole prompt</summary>"
            f"<pre>{html.escape(prompt)}</pre></details>"
            f"<table><tr><th>gold</th><td><pre>{html.escape(sample['gold'])}</pre></td><td></td></tr>"
            + "".join(rows) + "</table></div>")


def examples_section(results, samples):
    """Rows where the first two models (base and tuned when present) disagree on the first metric."""
    labels = list(results["models"])
    metric_names = [m for m in results["metrics"] if m != "loss"]
    if not metric_names or not samples:
        return ""
    key = metric_names[0]
    if "base" in labels and "tuned" in labels:
        pair = ["base", "tuned"]
    else:
        pair = labels[:2]
    if len(pair) == 2:
        chosen = [s for s in samples if s["verdicts"][pair[0]][key]["correct"] != s["verdicts"][pair[1]][key]["correct"]]
        title = f"Where {pair[0]} and {pair[1]} disagree on {key} ({len(chosen)} of {len(samples)} rows)"
    else:
        chosen = [s for s in samples if not s["verdicts"][pair[0]][key]["correct"]]
        title = f"Rows {pair[0]} gets wrong on {key} ({len(chosen)} of {len(samples)})"
    shown = "".join(_example(s, labels, metric_names) for s in chosen[:MAX_EXAMPLES])
    more = f"<p class=meta>… and {len(chosen) - MAX_EXAMPLES} more in eval/samples.jsonl.</p>" \
        if len(chosen) > MAX_EXAMPLES else ""
    return f"<h2 id=examples>{html.escape(title)}</h2>" + (shown or "<p>None.</p>") + more


def render(results, samples, curves):
    """The whole page as a string."""
    gen = results["generation"]
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>tunelab report</title>"
             f"<style>{STYLE}</style></head><body>",
             "<h1>tunelab evaluation report</h1>",
             f"<p class=meta>{results['rows']} rows of {html.escape(results['data'])} · {html.escape(results['created'])} · "
             f"{'greedy' if gen['temp'] <= 0 else 'temperature ' + str(gen['temp'])} decoding, at most "
             f"{gen['max_tokens']} tokens an answer</p>",
             "<h2>Metrics</h2>", metrics_table(results)]
    accuracy = accuracy_png(results)
    if accuracy:
        parts.append(f"<img id=accuracy-plot alt='accuracy per model' src='{accuracy}'>")
    parts.append("<h2>Training</h2>")
    curve = loss_curves_png(curves)
    if curve:
        parts.append(f"<img id=loss-plot alt='training and validation loss' src='{curve}'>")
    else:
        parts.append("<p>No training metrics (metrics.jsonl) in this run folder.</p>")
    parts.append(examples_section(results, samples))
    parts.append("</body></html>\n")
    return "\n".join(parts)
