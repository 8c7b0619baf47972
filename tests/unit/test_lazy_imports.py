"""`tunelab --help` and the data commands never import torch or mlx; engine imports stay in engines/."""

import subprocess
import sys
from pathlib import Path

import tunelab

PROBE = """
import sys
from tunelab.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "mlx", "transformers", "peft") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


def _heavy_modules(argv, cwd):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                         cwd=cwd, check=True).stdout
    return out.strip().splitlines()[-1]


def test_help_and_prepare_do_not_import_engines(tmp_path):
    assert _heavy_modules(["--help"], tmp_path) == "HEAVY:"
    assert _heavy_modules(["lora", "--help"], tmp_path) == "HEAVY:"
    assert _heavy_modules(["prepare", "--out", str(tmp_path / "d")], tmp_path) == "HEAVY:"
    assert (tmp_path / "d" / "train.jsonl").is_file()


def test_only_engine_packages_import_torch_at_module_level():
    root = Path(tunelab.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if "engines" in path.relative_to(root).parts[:1] and path.parent.name.endswith("_engine"):
            continue
        for line in path.read_text().splitlines():
            if line.startswith(("import torch", "from torch", "import mlx", "from mlx", "import peft",
                                "from peft", "import transformers", "from transformers")):
                offenders.append(f"{path.relative_to(root)}: {line}")
    assert offenders == []
