#!/usr/bin/env bash
# Every GPU benchmark and the GPU tests in one command, each step under its own time limit.
#
#   bash benchmarks/gpu_suite.sh OUT [STEP ...]
#
# STEP is any of: tests convrnn speed arch ensemble scale sharded (default: all, in that
# order). Each step writes its results under OUT/<step>/ and its output to OUT/<step>.log;
# a step that runs out of time or fails is reported and the next one runs. OUT/summary.txt
# lists each step's exit status and wall time. Limits (seconds) come from the
# environment: LIMIT_TESTS, LIMIT_CONVRNN, ... (defaults below), so that a run fits the
# time a machine is lent for. Copy OUT/<step>/ into benchmarks/results/ to commit it.
set -u
out=${1:?usage: gpu_suite.sh OUT [STEP ...]}
shift
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests convrnn speed arch ensemble scale sharded)
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"

run() {  # run STEP LIMIT COMMAND...
    local step=$1 limit=$2
    shift 2
    mkdir -p "$out/$step"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$step.log" 2>&1
    local rc=$?
    echo "$step rc=$rc wall=$((SECONDS - start))s limit=${limit}s" | tee -a "$out/summary.txt"
}

for step in "${steps[@]}"; do
    case $step in
        tests) run tests "${LIMIT_TESTS:-150}" python -m pytest -m gpu -q -p no:cacheprovider "$root/tests" ;;
        convrnn) run convrnn "${LIMIT_CONVRNN:-900}" python "$here/convrnn.py" --out "$out/convrnn" ;;
        speed) run speed "${LIMIT_SPEED:-1500}" python "$here/speed.py" --out "$out/speed" ;;
        arch) run arch "${LIMIT_ARCH:-200}" python "$here/arch_search.py" --profile \
            --max-waste 0,0.3,0.5,0.75 --out "$out/arch" ;;
        ensemble) run ensemble "${LIMIT_ENSEMBLE:-150}" python "$here/ensemble.py" --out "$out/ensemble" ;;
        scale) run scale "${LIMIT_SCALE:-420}" python "$here/distributed.py" --suite scale --out "$out/scale" ;;
        sharded) run sharded "${LIMIT_SHARDED:-200}" torchrun --standalone --nproc-per-node \
            "$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')" \
            "$here/distributed.py" --suite sharded --out "$out/sharded" ;;
        *) echo "gpu_suite.sh: unknown step '$step' (tests convrnn speed arch ensemble scale sharded)" >&2
           exit 2 ;;
    esac
done
