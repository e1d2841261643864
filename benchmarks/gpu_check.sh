#!/usr/bin/env bash
# One GPU check, under 8 minutes: install the carried wheels, run tests/gpu, run
# benchmarks/bench_gpu.py, print its table last and a one-line summary.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (python3 with torch+CUDA)
#   bash benchmarks/gpu_check.sh --dry-run  # on a CPU machine: .venv/bin/python, tiny bench
#
# Logs and bench_gpu.json go to $OUT when set, else /tmp/gpu_check. Every step runs even if an
# earlier one failed; the exit status is 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
LOG="${OUT:-/tmp/gpu_check}"
mkdir -p "$LOG"
TOTAL=${GPU_CHECK_TOTAL:-465} # seconds for the whole script (7:45), the bench gets what the tests leave
SECONDS=0
FAIL=()

if ((DRY)); then
    PY=.venv/bin/python
    [[ -x $PY ]] || PY=python3
    SITE="$LOG/site"
    WHEELS=(.whl/*-py3-none-any.whl) # the cp312 pydantic_core wheel needs the GPU machine's python
    BENCH_ARGS=(--dry-run)
else
    PY=python3
    SITE=/tmp/site
    WHEELS=(.whl/*.whl)
    read -r -a BENCH_ARGS <<<"${GPU_BENCH_ARGS:-}"
fi

echo "== 1. install carried wheels (${#WHEELS[@]}) into $SITE"
if [[ -e ${WHEELS[0]} ]] &&
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${WHEELS[@]}"; then
    INSTALL=ok
else
    INSTALL="failed"
    FAIL+=("install")
fi
export PYTHONPATH="$SITE:$PWD"
echo "install: $INSTALL"
command -v nvidia-smi >/dev/null && nvidia-smi -L
$PY - <<'PYEOF'
import importlib, importlib.metadata as md, torch
ok = torch.cuda.is_available()
print(f"torch {torch.__version__} (cuda {torch.version.cuda}, available {ok})", end="")
print(f": {torch.cuda.get_device_name()} sm{''.join(map(str, torch.cuda.get_device_capability()))}" if ok else "")
for m in ("triton", "transformers", "pydantic", "liger_kernel", "moespec", "pytest"):
    try:
        mod = importlib.import_module(m)
        v = getattr(mod, "__version__", None) or md.version(m.replace("_", "-"))
        print(f"  {m} {v}")
    except Exception as e:
        print(f"  {m}: NOT importable ({type(e).__name__}: {e})")
PYEOF

echo "== 2. GPU tests (timeout 240 s)"
if [[ ! -d tests/gpu ]]; then
    TESTS="skipped (no tests/gpu directory)"
elif ! $PY -c "import pytest" 2>/dev/null; then
    TESTS="FAILED (pytest is not installed for $PY)"
    FAIL+=("tests")
else
    rm -f "$LOG/tests_gpu.xml"
    timeout 240 $PY -m pytest --maxfail=40 --tb=short -q -rfE -p no:cacheprovider --junitxml="$LOG/tests_gpu.xml" tests/gpu 2>&1 |
        tee "$LOG/tests_gpu.log"
    rc=${PIPESTATUS[0]}
    # pyproject's addopts has -q already: at -qq pytest prints no count line, the XML has the counts.
    last=$($PY - "$LOG/tests_gpu.xml" 2>/dev/null <<'PYEOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
s = root if root.tag == "testsuite" else root.find("testsuite")
t, f, e, sk = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
print(f"{t - f - e - sk} passed, {f} failed, {e} errors, {sk} skipped")
PYEOF
    )
    case $rc in
    0) TESTS="passed: $last" && [[ $last == "0 passed"* ]] && ((!DRY)) && FAIL+=("tests(none ran)") ;;
    5) TESTS="no tests collected" ;;
    124) TESTS="TIMED OUT after 240 s: $last" && FAIL+=("tests") ;;
    *) TESTS="FAILED (rc $rc): $last" && FAIL+=("tests") ;;
    esac
fi
echo "tests: $TESTS (${SECONDS}s elapsed)"

# 2b. moespec tune on the Mixtral expert shape (GPU_TUNE=0 skips it; never in a dry run), into
# a table of its own ($LOG/tuning.json): the bench keeps the built-in tables, whose per-role
# entries a user table's generic entry would hide. One tile for all kernel roles
# (--no-roles): the role-by-role pass does not fit the window.
TUNE="skipped"
if ((!DRY)) && [[ ${GPU_TUNE:-1} != 0 ]]; then
    echo "== 2b. moespec tune (timeout ${GPU_TUNE_S:-110} s)"
    if timeout "${GPU_TUNE_S:-110}" $PY -m moespec tune specs/mixtral-8x7b.yaml target.backend=triton \
        target.device=cuda target.dtype=bf16 --tokens 4096 --repeat 3 --no-roles --table "$LOG/tuning.json" 2>&1 | tee "$LOG/tune.log"; then
        TUNE="ok"
    else
        TUNE="failed or timed out (see tune.log)"
    fi
fi
echo "tune: $TUNE (${SECONDS}s elapsed)"

LEFT=$((TOTAL - SECONDS))
BT=$((LEFT < 300 ? LEFT : 300))
echo "== 3. bench (timeout ${BT} s, cases start until $((BT - 70)) s)"
JSON="$LOG/bench_gpu.json"
rm -f "$JSON"
if ((BT < 100)); then
    BENCH="skipped (only ${LEFT}s left)"
    FAIL+=("bench")
else
    timeout "$BT" $PY benchmarks/bench_gpu.py "${BENCH_ARGS[@]}" --json "$JSON" --budget-s $((BT - 70)) \
        >"$LOG/bench_gpu.log" 2>"$LOG/bench_gpu.err"
    rc=$?
    tail -n 40 "$LOG/bench_gpu.err" # tracebacks of failed cases
    case $rc in
    0) BENCH="ok" ;;
    1) BENCH="ran; some cases errored or failed the check (rc 1)" && FAIL+=("bench") ;;
    124) BENCH="TIMED OUT after ${BT}s (table below is partial)" && FAIL+=("bench") ;;
    *) BENCH="FAILED (rc $rc)" && FAIL+=("bench") ;;
    esac
fi

echo
echo "================================ bench_gpu table ================================"
if [[ -s $JSON ]]; then
    $PY benchmarks/bench_gpu.py --print-json "$JSON" || tail -n 60 "$LOG/bench_gpu.log"
else
    tail -n 60 "$LOG/bench_gpu.log" 2>/dev/null
fi
echo
STATUS=$([[ ${#FAIL[@]} -eq 0 ]] && echo OK || echo "FAILED: ${FAIL[*]}")
echo "gpu_check: $STATUS | install $INSTALL | tests $TESTS | tune $TUNE | bench $BENCH | ${SECONDS}s | logs in $LOG"
[[ ${#FAIL[@]} -eq 0 ]]
