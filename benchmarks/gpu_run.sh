#!/usr/bin/env bash
# One call on a lent GPU machine (15 minutes of device time in all, at most 10 per command), in three stages that
# each write their files under $OUT as soon as they end, so a call cut short still returns what was measured:
#   machine.txt  GPU name, driver, torch / CUDA / triton versions, the commit measured (and whether the tree is dirty)
#   stages.txt   one line per stage and step: what ran, its exit status, its seconds, "timed out" where capped
#   stage1/      build log; smoke.md / smoke.json: every op at one preset vs the float64 reference, values and
#                gradients, float32 and bfloat16 (benchmarks/gpu_smoke.py); under 3 minutes
#   stage2/      benchmarks/report.py per op suite, each capped in time: <op>.txt and the report's .json / .md
#   stage3/      the CUDA cases of the test files, one file at a time, each with a timeout, while time is left
# The whole run ends within KDFAST_GPU_BUDGET_S seconds (default 500: well inside 9 minutes). Installs nothing the
# image has (torch, triton): only kdfast itself, built against the image's torch without build isolation.
#
# Dry run (CI, no GPU): `benchmarks/gpu_run.sh --dry-run` or KDFAST_GPU_DRY_RUN=1: the same stages on the CPU, the
# smoke test at tiny shapes on the cpp and Triton-interpreter backends, one small report suite with the quick
# timing, a few interpreter tests, tiny caps; the build stage checks the installed build instead of rebuilding.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY="${KDFAST_GPU_DRY_RUN:-0}"
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if [[ "$DRY" == 1 ]]; then
  OUT="${OUT:-$(mktemp -d)}"
  BUDGET="${KDFAST_GPU_BUDGET_S:-300}"  # about 15 CPU seconds; the caps leave room for a loaded 2-core machine
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
  OUT="${OUT:-benchmarks/results/gpu-run}"
  BUDGET="${KDFAST_GPU_BUDGET_S:-500}"
fi
mkdir -p "$OUT/stage1" "$OUT/stage2" "$OUT/stage3"
START=$SECONDS
FAILED=0

left() { echo $(( BUDGET - (SECONDS - START) )); }
min() { (( $1 < $2 )) && echo "$1" || echo "$2"; }

# step NAME CAP LOG COMMAND...: runs COMMAND under a time cap with its output in LOG, and records the outcome.
step() {
  local name="$1" cap="$2" log="$3"; shift 3
  if (( cap < 5 )); then
    echo "$name: skipped, $(left) s left" | tee -a "$OUT/stages.txt"
    [[ "$DRY" == 1 ]] && FAILED=1  # a dry run that skips a step has not checked its plumbing
    return 0
  fi
  local began=$SECONDS
  timeout --kill-after=10 "$cap" "$@" > "$log" 2>&1
  local rc=$?
  local note=""
  (( rc == 124 || rc == 137 )) && note=" (timed out at $cap s)"
  echo "$name: rc=$rc $(( SECONDS - began )) s$note" | tee -a "$OUT/stages.txt"
  (( rc != 0 )) && FAILED=1
  return $rc
}

# ------------------------------------------------------------------------------------------- machine.txt
{ if [[ "$DRY" == 1 ]]; then echo "dry run on the CPU ($(nproc) cores)"
  else nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)')"
  echo "budget $BUDGET s"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# ------------------------------------------------------------------------------- stage 1: build + smoke
if [[ "$DRY" == 1 ]]; then
  # CI built kdfast (extension required) just before: check that build instead of compiling it again.
  step "stage1 build (checked, not rebuilt)" 30 "$OUT/stage1/install.txt" \
    python -c "import torch, kdfast; from kdfast import _backend; print(kdfast.info()); assert not _backend.extension_error(), _backend.extension_error()"
  step "stage1 smoke" "$(min 120 "$(left)")" "$OUT/stage1/smoke.txt" \
    python benchmarks/gpu_smoke.py --out "$OUT/stage1" --device cpu --tiny
else
  MAX_JOBS=16 step "stage1 build" "$(min 150 "$(left)")" "$OUT/stage1/install.txt" \
    python -m pip install --no-build-isolation --no-deps -e . \
    || { tail -20 "$OUT/stage1/install.txt"; echo "build failed: nothing else can run"; exit 1; }
  python -c "import kdfast; print(kdfast.info())" | tee -a "$OUT/machine.txt"
  step "stage1 smoke" "$(min 150 $(( $(left) - 60 )))" "$OUT/stage1/smoke.txt" \
    python benchmarks/gpu_smoke.py --out "$OUT/stage1" --device cuda
fi
tail -3 "$OUT/stage1/smoke.txt"

# ------------------------------------------------------------------------------ stage 2: benchmark report
# Op suites in order of the design's GPU targets; each gets an equal share of what is left before stage 3's
# reserve, at most 75 s (torch.compile of the baselines takes most of it). A capped suite leaves no table.
if [[ "$DRY" == 1 ]]; then
  SUITES=(slot_match)
  REPORT_ARGS=(--device cpu --quick --save -k "index and movi-c and not compile")
  RESERVE=30
else
  SUITES=(slot_match slot_contrastive_loss slot_attention gini_kl lora)
  REPORT_ARGS=()
  RESERVE=100
fi
for i in "${!SUITES[@]}"; do
  op="${SUITES[$i]}"
  share=$(( ($(left) - RESERVE) / (${#SUITES[@]} - i) ))
  step "stage2 report $op" "$(min 75 "$share")" "$OUT/stage2/$op.txt" \
    python benchmarks/report.py --ops "$op" --out "$OUT/stage2" "${REPORT_ARGS[@]}"
done
grep -hE "^\| " "$OUT"/stage2/*.md 2>/dev/null | head -40

# ------------------------------------------------------------------------------------- stage 3: CUDA tests
if [[ "$DRY" == 1 ]]; then
  FILES=(tests/test_slot_match.py)
  SELECT=(-k "test_cosine_similarity_matches_reference and cpu-triton and float32")
else
  FILES=(tests/test_slot_match.py tests/test_slot_contrastive_loss.py tests/test_slot_attention.py
         tests/test_gini_kl.py tests/test_lora.py tests/test_launch_counts.py tests/test_autocast.py)
  SELECT=(-k cuda)
fi
for file in "${FILES[@]}"; do
  name=$(basename "$file" .py)
  step "stage3 $name" "$(min 90 $(( $(left) - 2 )))" "$OUT/stage3/$name.txt" \
    python -m pytest -q -p no:cacheprovider -x "$file" "${SELECT[@]}"
  [[ -f "$OUT/stage3/$name.txt" ]] && tail -1 "$OUT/stage3/$name.txt"
done

echo "done in $(( SECONDS - START )) s of $BUDGET; results in $OUT" | tee -a "$OUT/stages.txt"
exit $FAILED
