# Sourced by the run_gpu*.sh scripts: output folder, Python, and the carried wheels (.whl/)
# installed into /tmp/kure_site (the device image lacks qwix and ml_collections).
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/kure_site .whl/*.whl && export PYTHONPATH="/tmp/kure_site:$PYTHONPATH"
fi
