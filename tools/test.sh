#!/usr/bin/env bash
# The whole test suite: builds the environment if needed (tools/bootstrap.sh), then runs pytest.
# Extra arguments go to pytest (e.g. `bash tools/test.sh -k schema`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/bootstrap.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
