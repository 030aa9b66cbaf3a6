#!/usr/bin/env bash
# The GPU check for a lent GPU machine, in under 10 minutes:
#   1. the CUDA subset of the tests (`pytest -m cuda`; skipped when no test carries the marker),
#   2. benchmarks/bench_gpu.py: an SDXL-size UNet (1024 px, bf16) trained by our node and by ComfyUI's built-in node
#      (steps/s, peak VRAM, achieved TFLOP/s), then a Flux dev-size model (fp8 base, 512 and 1024 px) trained by
#      ours, the built-in and (where it has the input) the built-in with `offloading` on (issue 9),
#   3. benchmarks/bench_data_scaling.py for N = 10, 100, 1000: peak VRAM against the data set's size (issue 14).
# Results (text and JSON) go to $OUT when it is set, else to a fresh temporary folder (printed).
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere, CI included (< 1 minute): imports, a reduced SDXL on the
#                                            # CPU for 1 step through both nodes and the FLOP counter, a
#                                            # reduced fp8 Flux through our node; exits 0 if it ran
#
# The GPU machine has no network and a bare checkout: it needs the ComfyUI tree (carry `.cache/comfyui-0.3.75`, or set
# COMFYUI_DIR) and a Python with torch (PYTHON=..., else .venv/bin/python when it works, else python3). ComfyUI imports
# `av` and `torchsde` at module level without using them for training; where they are missing, import-only stubs are
# put on PYTHONPATH (and reported).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

out="${OUT:-}"
[ -n "$out" ] || out="$(mktemp -d -t gpu_check.XXXXXX)"
mkdir -p "$out"

# -- a Python with torch ------------------------------------------------------------------------------------------
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for cand in "$root/.venv/bin/python" python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then py="$cand"; break; fi
  done
fi
if [ -z "$py" ]; then echo "gpu_check: no Python with torch found (set PYTHON=...)" >&2; exit 1; fi

# -- the ComfyUI tree -----------------------------------------------------------------------------------------------
comfy="${COMFYUI_DIR:-$root/.cache/comfyui-0.3.75}"
if [ ! -f "$comfy/main.py" ]; then
  echo "gpu_check: no ComfyUI at $comfy (run tools/bootstrap.sh here, carry .cache/comfyui-0.3.75 to the GPU machine," \
       "or set COMFYUI_DIR)" >&2
  exit 1
fi
export COMFYUI_DIR="$comfy" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

# -- import-only stubs for ComfyUI's module-level imports that training never uses ----------------------------------
stubs="$(mktemp -d -t gpu_check_stubs.XXXXXX)"
trap 'rm -rf "$stubs"' EXIT
stub='class _Stub:
    def __init__(self, *a, **k): pass
def __getattr__(name):
    if name.startswith("__"): raise AttributeError(name)
    return _Stub
'
stubbed=""
for mod in av torchsde; do
  if ! "$py" -c "import $mod" >/dev/null 2>&1; then
    mkdir -p "$stubs/$mod"
    printf '%s' "$stub" >"$stubs/$mod/__init__.py"
    if [ "$mod" = av ]; then
      mkdir -p "$stubs/av/subtitles"
      for f in container.py subtitles/__init__.py subtitles/stream.py; do printf '%s' "$stub" >"$stubs/av/$f"; done
    fi
    stubbed="$stubbed $mod"
  fi
done
if [ -n "$stubbed" ]; then
  export PYTHONPATH="$stubs${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_check: import-only stubs for:$stubbed (not used by training)"
fi

echo "gpu_check: python $("$py" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'), ComfyUI $comfy, results in $out"

# -- dry run: everything but the GPU ----------------------------------------------------------------------------------
if [ "$dry" = 1 ]; then
  cuda_tests="$(grep -rlE 'mark\.cuda' tests/ 2>/dev/null | tr '\n' ' ')"
  echo "gpu_check: CUDA tests (pytest -m cuda): ${cuda_tests:-none}"
  timeout 240 "$py" benchmarks/bench_gpu.py --dry-run --model both --json "$out/bench_gpu_dry.json" 2>&1 \
    | grep -v -e "Training LoRA" -e "torchaudio missing" -e "CPU Autocast" -e "autocast(" | tee "$out/bench_gpu_dry.txt"
  rc=${PIPESTATUS[0]}
  echo "gpu_check --dry-run: exit $rc"
  exit "$rc"
fi

# -- on the GPU -------------------------------------------------------------------------------------------------------
status=0
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"

if grep -rqE 'mark\.cuda' tests/ 2>/dev/null; then
  COMFYUI_DEVICE=gpu timeout 50 "$py" -m pytest -m cuda -q -p no:cacheprovider 2>&1 | tail -30 | tee "$out/cuda_tests.txt"
  rc=${PIPESTATUS[0]}
  case "$rc" in
    0) echo "gpu_check: CUDA tests passed" ;;
    5) echo "gpu_check: no CUDA tests collected" ;;
    *) echo "gpu_check: CUDA tests FAILED (exit $rc)"; status=1 ;;
  esac
else
  echo "gpu_check: no test carries the cuda marker; nothing to run" | tee "$out/cuda_tests.txt"
fi

# SDXL first, so that a timeout in the Flux part still leaves the SDXL figures.
bench() {  # name, outer timeout, bench_gpu.py arguments...
  local name="$1" limit="$2"; shift 2
  timeout "$limit" "$py" benchmarks/bench_gpu.py "$@" --json "$out/bench_gpu_$name.json" 2>&1 | tee "$out/bench_gpu_$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "gpu_check: GPU benchmark $name FAILED (exit $rc)"; status=1; }
}
echo "gpu_check: SDXL 1024 px, checkpointing on: ours, built-in, bare limit; ~40-60 s a run, at most 200 s"
bench sdxl 220 --model sdxl --checkpointing on --steps 10 --timeout 120 --budget 200
echo "gpu_check: data scaling (issue 14): peak VRAM, extra RSS and s/step of our node for N = 10, 100, 1000 items with" \
     "512 x 4096 captions; ~60-90 s, at most 150 s"
timeout 150 "$py" benchmarks/bench_data_scaling.py --ns 10,100,1000 --builtin never --steps 4 \
  --json "$out/bench_data_scaling.json" 2>&1 | tee "$out/bench_data_scaling.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu_check: data scaling FAILED"; status=1; }
echo "gpu_check: Flux dev fp8 512 and 1024 px: ours, built-in (and built-in with offloading where it has the input);" \
     "the 12 GB weights file first (~1 min, cached in .cache/bench_models), then ~30-60 s a run, at most 250 s"
bench flux 270 --model flux --steps 4 --timeout 120 --budget 250
echo "gpu_check: exit $status; results in $out"
exit "$status"
