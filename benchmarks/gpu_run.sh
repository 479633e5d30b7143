#!/usr/bin/env bash
# One call on a lent GPU machine: build kdfast against the image's torch, run the whole test suite on CUDA,
# then the GPU benchmark report. Everything lands under $OUT (default: benchmarks/results/gpu-run):
#   tests.txt    the pytest output (CUDA cases included; the Triton kernels run compiled, not interpreted)
#   report.txt   the report printed by benchmarks/report.py
#   <gpu>-<date>-all.json / .md   the report files to commit to benchmarks/results/
# Installs nothing the image already has (torch, triton); only kdfast itself, without build isolation.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-run}"
mkdir -p "$OUT"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null || echo "commit unknown"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

MAX_JOBS=16 python -m pip install --quiet --no-build-isolation --no-deps -e . > "$OUT/install.txt" 2>&1 \
  || { echo "install failed"; tail -20 "$OUT/install.txt"; exit 1; }
python -c "import kdfast; print(kdfast.info())" | tee -a "$OUT/machine.txt"

python -m pytest -q -p no:cacheprovider > "$OUT/tests.txt" 2>&1
tests_rc=$?
tail -5 "$OUT/tests.txt"

python benchmarks/report.py --out "$OUT" > "$OUT/report.txt" 2>&1
report_rc=$?
grep -E "^- " "$OUT/report.txt" | head -60
echo "tests rc=$tests_rc report rc=$report_rc"
exit $(( tests_rc || report_rc ))
