"""The benchmark scripts run: the GPU check's CPU dry-run (a reduced SDXL UNet, one step, ours and the built-in node;
a reduced fp8 Flux dev), the per-layer adapter floor at a toy size, and a reduced soak (issue 10) that passes, and one
made to fail."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.slow("runs the benchmark scripts end to end (a reduced SDXL and fp8 Flux, a soak): ~2 min")

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


def _soak(*args: str, json_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak.py"), *args, "--json", str(json_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_soak_reduced_run_samples_the_server_and_passes(tmp_path):
    done = _soak("--steps", "200", "--every", "50", "--prompts", "3", json_path=tmp_path / "soak.json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Table rows: "step | RSS MiB | fds" for the long prompt, "prompt | RSS MiB | fds | s" for the prompts in a row.
    steps = re.findall(r"^\s*(\d+) \|\s+(\d+\.\d) \|\s+(\d+)(?:  <- end of warm-up)?$", done.stdout, flags=re.M)
    prompts = re.findall(r"^\s*(\d+) \|\s+(\d+\.\d) \|\s+(\d+) \|\s+\d+\.\d", done.stdout, flags=re.M)
    assert [int(s) for s, _, _ in steps] == [50, 100, 150, 200], done.stdout
    assert [int(p) for p, _, _ in prompts] == [1, 2, 3], done.stdout
    # Read from the server's own process: a ComfyUI with torch loaded, and its sockets and log open.
    assert all(float(rss) > 200 and int(fds) >= 3 for _, rss, fds in steps + prompts), done.stdout
    assert "RSS step 50 -> 200" in done.stdout and "open fds prompt 2 -> 3" in done.stdout
    assert len(re.findall(r"^  .*: PASS$", done.stdout, flags=re.M)) == 6, done.stdout  # 2 + 4 checks
    assert "FAIL" not in done.stdout and "soak: PASS" in done.stdout
    figures = json.loads((tmp_path / "soak.json").read_text())
    assert figures["long_run"]["steps_seen"] == 200 and figures["long_run"]["warmup_step"] == 50
    assert figures["settings"]["training_dtype"] == "fp32"
    assert len({s["saved"] for s in figures["prompts"]["samples"]}) == 3


def test_soak_exits_1_when_a_check_fails(tmp_path):
    # No growth is below -100 %: the RSS checks must fail, and the exit status must say so.
    done = _soak("--steps", "20", "--every", "10", "--prompts", "1", "--rss-limit-pct", "-100",
                 json_path=tmp_path / "soak.json")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "soak: FAIL" in done.stdout and "limit < -100 %: FAIL" in done.stdout
    checks = {c["name"]: c["passed"] for phase in ("long_run", "prompts")
              for c in json.loads((tmp_path / "soak.json").read_text())[phase]["checks"]}
    assert checks == {"RSS step 10 -> 20": False, "progress events": True, "RSS prompt 1 -> 1": False,
                      "open fds prompt 1 -> 1": True, "distinct LoRA files saved": True}, checks
