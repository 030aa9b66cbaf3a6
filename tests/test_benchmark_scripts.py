"""The benchmark scripts run: the GPU check's CPU dry-run (a reduced SDXL UNet, one step, ours and the built-in node;
a reduced fp8 Flux dev) and the per-layer adapter floor at a toy size."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ours" in done.stdout and "exit 0" in done.stdout
    cases = {c["case"]["model"]: c for c in json.loads((tmp_path / "bench_gpu_dry.json").read_text())["cases"]}
    assert set(cases) == {"sdxl", "flux"}
    flux = {r["node"]: r for r in cases["flux"]["runs"]}
    assert "error" not in flux["ours"] and flux["ours"]["dtype"] == "torch.float8_e4m3fn", flux


def test_layer_floor_prints_a_row_per_shape():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_layer.py"), "--widths", "16",
                           "--tokens", "4,8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\s*16→(16|64)\s+(4|8) \|.*%$", done.stdout, flags=re.M)
    assert sorted(rows) == [("16", "4"), ("16", "8"), ("64", "4"), ("64", "8")], done.stdout
