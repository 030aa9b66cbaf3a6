#!/usr/bin/env bash
# The tests: builds the environment if needed (tools/bootstrap.sh), then runs pytest on a tier (tests/tiers.py).
#   bash tools/test.sh           the fast tier: every module's unit tests, every node through a real ComfyUI, the
#                                contract, one family of each kind, each file format, a cancel and a resume
#   bash tools/test.sh --full    the full tier (what CI runs): the fast tier, then every other test; prints each
#                                tier's wall time
# Other arguments go to pytest (e.g. `bash tools/test.sh -k schema`, `bash tools/test.sh --full -x`).
# TEST_WORKERS=N runs N pytest-xdist workers (default 2; 0 = no xdist), each with its own ComfyUI server.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/bootstrap.sh" || exit $?
cd "$root"

full=0
args=()
for arg in "$@"; do
  if [ "$arg" = "--full" ]; then full=1; else args+=("$arg"); fi
done
workers="${TEST_WORKERS:-2}"
xdist=()
if [ "$workers" -gt 0 ]; then xdist=(-n "$workers" --dist loadgroup); fi

# Runs one tier; prints its wall time; returns pytest's exit status ("no tests collected", 5, is a failure).
run_tier() {
  local tier="$1"; shift
  local start=$SECONDS
  "$root/.venv/bin/python" -m pytest --tier "$tier" "${xdist[@]}" "$@"
  local rc=$?
  echo "[test] tier $tier: $((SECONDS - start)) s wall (pytest exit $rc)"
  return "$rc"
}

if [ "$full" = 0 ]; then
  run_tier fast "${args[@]}"
  exit $?
fi
run_tier fast "${args[@]}"; fast_rc=$?
run_tier slow "${args[@]}"; slow_rc=$?
echo "[test] full tier = fast (exit $fast_rc) + slow (exit $slow_rc): $SECONDS s wall in all"
# A tier with no test selected (5, e.g. under -k) is fine when the other one ran tests.
if [ "$fast_rc" -eq 5 ] && [ "$slow_rc" -ne 5 ]; then fast_rc=0; fi
if [ "$slow_rc" -eq 5 ] && [ "$fast_rc" -eq 0 ]; then slow_rc=0; fi
if [ "$fast_rc" -ne 0 ]; then exit "$fast_rc"; fi
exit "$slow_rc"
