#!/usr/bin/env bash
# One prepared GPU run of every benchmark, under 8 minutes on one H100; results land in $OUT:
# gpu_check / fake_quant_throughput / kure_penalty / train_step, each a .json and a .log
# (8 files: the device tool returns at most 8). Each script saves after every row, so a script
# stopped at its time limit still leaves its finished rows.
#
# Preparation, once, on the CPU host in the repo root. The device image has jax, flax, optax,
# chex and orbax but neither qwix (the peer library) nor ml_collections (kure_jax.training):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       qwix==0.1.8 ml_collections==1.1.0
# then call the device tool with: command="bash benchmarks/run_gpu.sh", carry=[".whl"],
# timeout_s=560. Without the wheels the qwix and library rows record an ImportError.
#
# Budget (seconds): check 60 + throughput 100 + penalty 80 + train step 200 = 440 (< 8 min).
source "$(dirname "$0")/_gpu_env.sh"

run() {
  local limit=$1 script=$2 name start rc
  shift 2
  name=$(basename "$script" .py)
  start=$SECONDS
  {
    echo "# env"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1
  } > "$OUT/$name.log"
  timeout -k 5 "$limit" "$PY" "$script" --out "$OUT" "$@" >> "$OUT/$name.log" 2>&1
  rc=$?
  echo "# $name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/$name.log"
}

run 60 benchmarks/gpu_check.py
run 100 benchmarks/fake_quant_throughput.py
run 80 benchmarks/kure_penalty.py
run 200 benchmarks/train_step.py
