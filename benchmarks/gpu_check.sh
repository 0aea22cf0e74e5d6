#!/usr/bin/env bash
# The checks that need a GPU, as one bounded script (about 6 minutes on one H200 with 16 CPU cores):
#   1. the check's cost on the GPU, and of a CPU validator beside a GPU stage (benchmarks/overhead.py), alone;
#   2. in parallel: the whole suite (the CUDA tests included) under this machine's Python and torch, and detection
#      at the `base` preset on the GPU (two attacked runs with --compare, an honest run).
# Everything lands in $OUT (default runs/gpu) and is packed into $OUT/gpu.tar.gz; a digest is printed at the end.
# Needs the project and its test extras importable by $PYTHON (default python3) and `sentinel-node` on PATH.
#
#     bash benchmarks/gpu_check.sh
#     OLD=../other-checkout bash benchmarks/gpu_check.sh    # also time another version of the check (A/B)
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

# 1. timings first, with the machine otherwise idle. OLD=path/to/another/checkout times that one too (A/B)
OV="benchmarks/overhead.py --presets small,base,large --device cuda"
if [ -n "${OLD:-}" ]; then
  timeout 100 $PY "$OLD/benchmarks/overhead.py" ${OV#benchmarks/overhead.py} --repeats 10 >"$R/overhead_gpu_old.md" 2>&1
fi
timeout 100 $PY $OV --repeats 10 >"$R/overhead_gpu.md" 2>&1
timeout 100 $PY $OV --check-device cpu --repeats 5 >"$R/overhead_cpu_validator.md" 2>&1
timeout 60 $PY benchmarks/overhead.py --presets base --device cuda --repeats 3 --profile 2 >"$R/profile_base.txt" 2>&1

# 2. the rest side by side (each simulation on 2 CPU threads: 16 cores, 4 processes)
SIM="$PY -m node.cli simulate --preset base --stages 8 --replicas 4 --steps 60 --warmup 30 --device cuda --quiet
  --threads 2"
for s in 1 2; do
  (timeout 280 $SIM --attack mixed --compare --seed $s --report "$R/base_mixed$s.json" >"$R/base_mixed$s.log" 2>&1) &
done
(timeout 280 $SIM --attack none --seed 2 --report "$R/base_honest2.json" >"$R/base_honest2.log" 2>&1) &
# no -n: pytest-xdist would run the forked tests after others have started CUDA in the same worker (tests/conftest.py)
(timeout 330 $PY -m pytest -q -p no:cacheprovider -rs >"$R/suite.log" 2>&1; echo "rc=$?" >>"$R/suite.log") &
wait

[ -f "$R/overhead_gpu_old.md" ] && { echo "## overhead, GPU validator, $OLD"; cat "$R/overhead_gpu_old.md"; }
echo "## overhead, GPU validator"; cat "$R/overhead_gpu.md"
echo "## overhead, CPU validator beside a GPU stage"; cat "$R/overhead_cpu_validator.md"
echo "## profile"; head -c 3500 "$R/profile_base.txt"
echo "## suite"; grep -E "^(FAILED|ERROR|SKIPPED)" "$R/suite.log"; tail -n 3 "$R/suite.log"
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
