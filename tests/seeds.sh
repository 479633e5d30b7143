#!/usr/bin/env bash
# Replays the suite under many fresh seeds before a release, so that a test failing for some seeds is found here
# and not by CI: the fast part (no Triton interpreter, no sm_90 compiles, no slow or kill-and-resume cases) under
# FAST_SEEDS seeds, then the whole suite under FULL_SEEDS seeds. Prints each failing seed with the command that
# replays it, and exits non-zero if any failed.
# The fast part also leaves out the files whose tests draw nothing from the test seed, being subprocess and CLI
# plumbing with fixed seeds (the full runs keep them): test_cli_startup.py, test_packaging.py, test_gpu_compile.py,
# test_train_cli.py, test_train_faults.py and test_train_ddp.py.
#   bash tests/seeds.sh            # 30 fast runs, 3 full runs (about 3 hours on 2 cores)
#   bash tests/seeds.sh 5 0        # 5 fast runs only
set -uo pipefail
cd "$(dirname "$0")/.."
fast_seeds=${1:-30}
full_seeds=${2:-3}
fast=(-m "not slow" -k "not triton and not sm90 and not sigkill")
for plumbing in cli_startup packaging gpu_compile train_cli train_faults train_ddp; do
    fast+=(--ignore "tests/test_$plumbing.py")
done
failed=()

run() {  # run <seed> <pytest args...>
    local seed=$1
    shift
    if ! KDFAST_TEST_SEED=$seed CI=true python -m pytest -q -p no:randomly "$@" >"/tmp/kdfast-seed-$seed.log" 2>&1; then
        failed+=("KDFAST_TEST_SEED=$seed python -m pytest $* (log: /tmp/kdfast-seed-$seed.log)")
        grep -E "^(FAILED|ERROR)" "/tmp/kdfast-seed-$seed.log" | head -5
    fi
    echo "seed $seed: $(tail -n 1 "/tmp/kdfast-seed-$seed.log")"
}

for _ in $(seq "$fast_seeds"); do
    run $((RANDOM * 32768 + RANDOM)) "${fast[@]}"
done
for _ in $(seq "$full_seeds"); do
    run $((RANDOM * 32768 + RANDOM))
done
if ((${#failed[@]})); then
    printf 'failing seeds:\n'
    printf '  %s\n' "${failed[@]}"
    exit 1
fi
echo "no seed failed ($fast_seeds fast runs, $full_seeds full runs)"
