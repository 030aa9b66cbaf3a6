#!/usr/bin/env bash
# The demo: builds the environment if needed, then trains a LoRA through a real ComfyUI (see tools/demo.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/bootstrap.sh"
exec "$root/.venv/bin/python" "$root/tools/demo.py" "$@"
