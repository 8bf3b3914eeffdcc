#!/usr/bin/env bash
# Third GPU run (prepared 2026-12-01, not yet run): what the 2026-11-27 runs left open.
#  0. The penalty kernels compile and match the jnp path (gpu_check.py --checks penalty; they
#     changed on 2026-12-01 to work in units of each tensor's scale), also for weights x 1e-8.
#  1. Device time of the KURE penalty + gradient over ResNet-18/50 params vs one copy of them,
#     with the time of each kernel (the profile: Pallas kernels vs the XLA merge between them)
#     and the A/B of that merge on the same params' block statistics (benchmarks/_merge_ab.py:
#     segment ops, as the library, vs masked reductions; rows "merge (segment)" / "merge
#     (masked)"), read from jax.profiler's trace (kernel_times.py --trace; under ncu this profile died with
#     a segmentation fault twice), with the fake-quant rows at 16M/64M for comparison.
#  2. The same penalty profile under ncu with XLA's command buffers (CUDA graphs) turned off,
#     a guess at what ncu could not instrument; cold-cache numbers if it works.
#  3. quant.fake_quant's backward after it stopped saving its mask (fake_quant_throughput.py).
#  4. The library train step after it stopped computing the logged kurtosis twice, and QAT
#     steps with the fused fake-quant kernels (QATConfig.kernel_impl="pallas") vs XLA's fusions.
# Prepared like run_gpu.sh (wheels in .whl/, see its header); device tool:
#   command="bash benchmarks/run_gpu_followup.sh", carry=[".whl"], timeout_s=510
# Budget (seconds): check 50 + trace 110 + ncu 90 + throughput 50 + train step 190 = 490 (a
# train-step row took ~20 s on 2026-11-27). At most 8 files land in $OUT (the device tool's
# limit): gpu_check.json, kernel_times.{log,json}, ncu.tgz, fake_quant_throughput.{log,json},
# train_step.{log,json}; the trace itself stays in /tmp.
source "$(dirname "$0")/_gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tail -1

start=$SECONDS
timeout -k 5 50 "$PY" benchmarks/gpu_check.py --checks penalty --out "$OUT" 2>&1 | grep "^|"
echo "# gpu_check (penalty): exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"

start=$SECONDS
(cd benchmarks && timeout -k 5 110 "$PY" kernel_times.py --trace /tmp/kure_trace --sizes 24,26 \
    --penalty --out "$OUT" > "$OUT/kernel_times.log" 2>&1)
echo "# kernel_times --trace: exit $? after $((SECONDS - start)) s"
grep -v "^W1\|^I1" "$OUT/kernel_times.log" | tail -80

NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
NCU_DIR=/tmp/kure_ncu
mkdir -p "$NCU_DIR"
start=$SECONDS
(cd benchmarks && XLA_FLAGS="--xla_gpu_enable_command_buffer=" timeout -k 5 90 "$NCU" \
    --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    --log-file "$NCU_DIR/ncu.csv" "$PY" kernel_times.py --sizes "" --penalty \
    > "$NCU_DIR/kernel_labels.txt" 2>&1)
echo "# penalty under ncu (${NCU:-no ncu}, command buffers off): exit $? after $((SECONDS - start)) s"
tar czf "$OUT/ncu.tgz" -C /tmp kure_ncu
(cd benchmarks && "$PY" kernel_times.py --parse "$NCU_DIR/ncu.csv" \
    --labels "$NCU_DIR/kernel_labels.txt") 2>&1 | tail -30

start=$SECONDS
timeout -k 5 50 "$PY" benchmarks/fake_quant_throughput.py --sizes 24 --out "$OUT" \
    > "$OUT/fake_quant_throughput.log" 2>&1
echo "# fake_quant_throughput: exit $? after $((SECONDS - start)) s"
grep "fq bwd\|copy" "$OUT/fake_quant_throughput.log" | tail -12

start=$SECONDS
timeout -k 5 190 "$PY" benchmarks/train_step.py --dtypes bfloat16 --out "$OUT" --configs \
    "fp,fp+KURE[pallas],QAT-lsq+KURE,QAT-lsq[pallas]+KURE,QAT-max+KURE,QAT-max[pallas]+KURE,library fp,library fp+KURE" \
    > "$OUT/train_step.log" 2>&1
echo "# train_step: exit $? after $((SECONDS - start)) s"; grep -v "^W1" "$OUT/train_step.log" | tail -16
