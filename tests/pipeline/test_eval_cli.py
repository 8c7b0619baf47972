"""`tunelab eval` end to end on a tiny model, answers read from files, and the report in a real browser."""

import json
import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import write_jsonl
from tests.pipeline.test_cli import error_of, run_cli


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """A prepared data folder, an adapter trained on it and the fused model, in one folder."""
    root = tmp_path_factory.mktemp("eval")
    for argv in (["prepare", "--out", "data", "--num-rows", "40", "--valid-rows", "4", "--test-rows", "6"],
                 ["lora", "--train", "--model", tiny_llama, "--data", "data", "--iters", "10", "--batch-size", "2",
                  "--num-layers", "1", "--mask-prompt", "--learning-rate", "3e-3", "--steps-per-report", "5",
                  "--steps-per-eval", "5", "--adapter-path", "run"],
                 ["fuse", "--model", tiny_llama, "--adapter-path", "run", "--save-path", "fused"]):
        r = run_cli(*argv, cwd=root)
        assert r.returncode == 0, r.stderr
    return root


def test_eval_compares_base_tuned_and_fused_on_the_same_rows(tiny_llama, trained):
    r = run_cli("eval", "--model", tiny_llama, "--adapter-path", "run", "--compare", "fused", "--data", "data",
                "--max-tokens", "16", "--batch-size", "4", cwd=trained)
    assert r.returncode == 0, r.stderr
    for label in ("base", "tuned", "fused"):                 # the terminal summary
        assert re.search(rf"^{label}\s+\d+\.\d% \[\d+-\d+\]", r.stdout, re.M), r.stdout
    assert f"Report:  {os.path.join('run', 'report.html')}" in r.stdout
    results = json.loads((trained / "run" / "eval" / "results.json").read_text())
    assert results["metrics"] == ["sql-exec", "sql-canonical", "loss"]   # builtin:sql data
    assert list(results["models"]) == ["base", "tuned", "fused"]
    for model in results["models"].values():
        assert model["metrics"]["sql-exec"]["total"] == 6
        low, high = model["metrics"]["loss"]["ci95"]
        assert low <= model["metrics"]["loss"]["value"] <= high
    samples = [json.loads(line) for line in (trained / "run" / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [s["index"] for s in samples] == list(range(6))
    # The fused folder is base + adapter: the same greedy answers, the same answer loss.
    assert all(s["answers"]["fused"] == s["answers"]["tuned"] for s in samples)
    tuned, fused = results["models"]["tuned"]["metrics"], results["models"]["fused"]["metrics"]
    assert fused["loss"]["value"] == pytest.approx(tuned["loss"]["value"], rel=1e-4)
    assert any(s["answers"]["base"] != s["answers"]["tuned"] for s in samples)
    # The answer loss is the test loss of `lora --test --mask-prompt` on the same rows.
    r = run_cli("lora", "--test", "--mask-prompt", "--model", tiny_llama, "--data", "data", "--adapter-path", "run",
                cwd=trained)
    assert f"Test loss {tuned['loss']['value']:.3f}," in r.stdout
    report = (trained / "run" / "report.html").read_text()
    assert "id=loss-plot" in report and "<table id=metrics>" in report


def test_answers_from_a_file_score_like_the_same_answers_generated(tiny_llama, trained):
    samples = [json.loads(line) for line in (trained / "run" / "eval" / "samples.jsonl").read_text().splitlines()]
    write_jsonl(trained / "copied.jsonl", [{"index": s["index"], "answer": s["answers"]["tuned"]} for s in samples])
    write_jsonl(trained / "gold.jsonl", [{"prompt": s["prompt"][-1]["content"], "answer": s["gold"]}
                                         for s in samples][:5])
    r = run_cli("eval", "--no-base", "--predictions", "copied.jsonl,perfect=gold.jsonl", "--data", "data",
                "--run-dir", "files", cwd=trained)
    assert r.returncode == 0, r.stderr
    assert "gold.jsonl: 1 of 6 rows have no answer and count as wrong" in r.stdout
    got = json.loads((trained / "files" / "eval" / "results.json").read_text())
    generated = json.loads((trained / "run" / "eval" / "results.json").read_text())
    assert got["metrics"] == ["sql-exec", "sql-canonical"]          # no model: no loss
    for name in got["metrics"]:
        assert got["models"]["copied"]["metrics"][name] == generated["models"]["tuned"]["metrics"][name]
        assert got["models"]["perfect"]["metrics"][name]["correct"] == 5
    assert got["models"]["perfect"]["rows_without_answer"] == 1


def test_eval_bad_input(capsys, tiny_llama, trained, tmp_path):
    err = error_of(capsys, "eval", "--model", tiny_llama, "--data", tmp_path / "none", "--metric", "bleu,exact")
    assert "test.jsonl not found" in err and "unknown metric 'bleu'" in err
    write_jsonl(tmp_path / "test.jsonl", [{"text": "plain"}])
    err = error_of(capsys, "eval", "--model", tiny_llama, "--data", tmp_path)
    assert "eval needs rows with a prompt and an answer" in err
    (tmp_path / "answers.jsonl").write_text('{"index": 0, "answer": "x"}\n{"answer": 1}\n')
    err = error_of(capsys, "eval", "--no-base", "--predictions", tmp_path / "answers.jsonl", "--data",
                   trained / "data", "--run-dir", tmp_path / "out")
    assert f"{tmp_path / 'answers.jsonl'}:2: answer: expected a string" in err
    assert not (tmp_path / "out").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Injected into a copy of the report: records load errors and, once loaded, what rendered.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || (e.target && e.target.src))), true);
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    images: [...document.images].map(i => [i.id, i.complete && i.naturalWidth > 100 && i.naturalHeight > 50]),
    metricRows: document.querySelectorAll("#metrics tr").length,
    errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(not CHROMIUM and not os.environ.get("TUNELAB_REQUIRE_BROWSER"),
                    reason="chromium is not installed (make test and .ci/run install Debian's chromium)")
def test_report_renders_in_headless_chromium(trained, tmp_path):
    assert CHROMIUM, "TUNELAB_REQUIRE_BROWSER is set but chromium is not installed"
    page = (trained / "run" / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                        "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    assert found, r.stdout[-2000:]
    seen = json.loads(found.group(1).replace("&quot;", '"'))
    assert seen["errors"] == []
    assert seen["metricRows"] == 1 + 3                       # header + base, tuned, fused
    assert dict(seen["images"]) == {"accuracy-plot": True, "loss-plot": True}
