#!/usr/bin/env bash
# The checks that need a GPU, as one bounded script (about 6 minutes on one H200 with 16 CPU cores):
#   1. the check's cost on the GPU, and of a CPU validator beside a GPU stage (benchmarks/overhead.py), alone;
#   2. in parallel: the CUDA tests (tests/test_cuda.py and the CUDA cases of the other files), detection at the
#      `base` preset on the GPU (an attacked run with --compare, two honest seeds, a backward attack), and the whole
#      CPU suite under this machine's Python and torch.
# Everything lands in $OUT (default runs/gpu) and is packed into $OUT/gpu.tar.gz; a digest is printed at the end.
#
#     bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT/gpu"
R="$OUT/gpu"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import sys, torch, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())"
  nproc
} >"$R/env.txt" 2>&1
cat "$R/env.txt"

# 1. timings first, with the machine otherwise idle
timeout 150 $PY benchmarks/overhead.py --presets small,base,large --device cuda --repeats 10 >"$R/overhead_gpu.md" 2>&1
timeout 120 $PY benchmarks/overhead.py --presets small,base,large --device cuda --check-device cpu --repeats 5 \
  >"$R/overhead_cpu_validator.md" 2>&1

# 2. the rest side by side
SIM="$PY -m node.cli simulate --preset base --stages 8 --replicas 4 --steps 60 --warmup 30 --device cuda --quiet"
(timeout 240 $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_attacks.py tests/test_model.py \
  tests/test_stats.py >"$R/pytest_cuda.log" 2>&1; echo "rc=$?" >>"$R/pytest_cuda.log") &
(timeout 270 $SIM --attack mixed --compare --seed 0 --report "$R/base_mixed.json" >"$R/base_mixed.log" 2>&1) &
(timeout 270 $SIM --attack random_sign --attack-direction backward --seed 0 --report "$R/base_rsign_bwd.json" \
  >"$R/base_rsign_bwd.log" 2>&1) &
for s in 0 1; do
  (timeout 270 $SIM --attack none --seed $s --report "$R/base_honest$s.json" >"$R/base_honest$s.log" 2>&1) &
done
(timeout 280 $PY -m pytest -q -p no:cacheprovider -n 4 --ignore tests/test_cuda.py >"$R/suite.log" 2>&1;
  echo "rc=$?" >>"$R/suite.log") &
wait

echo "## overhead, GPU validator"; cat "$R/overhead_gpu.md"
echo "## overhead, CPU validator beside a GPU stage"; cat "$R/overhead_cpu_validator.md"
echo "## CUDA tests"; tail -n 25 "$R/pytest_cuda.log"
echo "## suite"; tail -n 15 "$R/suite.log"
for f in "$R"/base_*.json; do
  $PY - "$f" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ["f1", "precision", "recall", "malicious", "banned", "false_bans", "time_to_ban", "tainted_microbatches",
        "microbatches", "val_loss", "val_loss_clean", "val_loss_undefended", "tokens_per_s", "validator_time_fraction"]
print(sys.argv[1].rsplit("/", 1)[-1], {k: r.get(k) for k in keys if k in r})
EOF
done
for f in "$R"/base_*.log; do echo "== $f"; tail -n 3 "$f"; done
tar -czf "$OUT/gpu.tar.gz" -C "$OUT" gpu
