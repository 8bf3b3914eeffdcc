#!/usr/bin/env bash
# Second GPU run (after run_gpu.sh): the Nsight Compute kernel-time profile of the fake-quant
# ops (benchmarks/kernel_times.py), the penalty check that run_gpu.sh's 60 s limit cut off, and
# the train-step rows it did not reach (library steps, qwix int4), each with the fp baseline
# measured again in the same process. Prepared like run_gpu.sh (wheels in .whl, carry .whl);
# device tool: command="bash benchmarks/run_gpu_profile.sh", timeout_s=330.
source "$(dirname "$0")/_gpu_env.sh"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: ${NCU:-not found}"
start=$SECONDS
(cd benchmarks && timeout -k 5 90 "$NCU" --clock-control none --metrics gpu__time_duration.sum \
    --csv --print-units base --log-file "$OUT/ncu.csv" \
    "$PY" kernel_times.py --sizes 24,26 > "$OUT/kernel_labels.txt" 2> "$OUT/kernel_times.err")
echo "# kernel_times under ncu: exit $? after $((SECONDS - start)) s"
(cd benchmarks && "$PY" kernel_times.py --parse "$OUT/ncu.csv" --labels "$OUT/kernel_labels.txt" \
    --out "$OUT") 2>&1 | tail -50
start=$SECONDS
timeout -k 5 50 "$PY" benchmarks/gpu_check.py --checks penalty --out "$OUT" > "$OUT/gpu_check.log" 2>&1
echo "# gpu_check penalty: exit $? after $((SECONDS - start)) s"; tail -5 "$OUT/gpu_check.log"
start=$SECONDS
timeout -k 5 140 "$PY" benchmarks/train_step.py --dtypes bfloat16 \
    --configs "fp,fp+KURE,library fp,library fp+KURE,qwix-qt+KURE" --out "$OUT" \
    > "$OUT/train_step.log" 2>&1
echo "# train_step: exit $? after $((SECONDS - start)) s"; grep -v "^W1" "$OUT/train_step.log" | tail -12
