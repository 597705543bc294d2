#!/usr/bin/env bash
# Every GPU measurement in one call (about 9 minutes on one H100/H200):
#   1. CUDA parity and CUDA-graph tests (pytest, skipped on CPU machines);
#   2. model level: the published configs, ours vs transformers, fp32 and bf16, plus CUDA-graph replay;
#   3. a profiled forward per head (top CUDA kernels), and each image-decoding path (nvJPEG included)
#      against the reference preprocessing, in pixels and logits;
#   4. end to end: /v1/classify over HTTP with 451x300, 1920x1080 and 4032x3024 JPEG uploads against the
#      model-level figure of the same checkpoint, with a
#      py-spy sample of the server process under saturation.
# Installs the serving dependencies the GPU image lacks from wheels in .whl/ (see docs/performance.md).
# Results (JSON + markdown) go to $OUT, or benchmarks/results/gpu.
# Knobs for partial reruns: DTYPES=bfloat16 (model dtypes), GRAPHS=0 (skip CUDA-graph variants),
# ONLY=flow,mlm (case-name filter), E2E=0 / TESTS=0 / MODELS=0 / PROFILE=0 / DECODE=0 (skip a stage),
# E2E_SECONDS=10.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; date -u; \
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; \
} | tee "$OUT/device.txt"

[ "${TESTS:-1}" = 1 ] && timeout 90 python3 -m pytest -q -p no:cacheprovider -W ignore::UserWarning -W ignore::DeprecationWarning \
    -W ignore::FutureWarning tests/perceiver_core/test_cuda.py tests/perceiver_core/processing/test_jpeg.py \
    tests/app/test_image_decoding.py 2>&1 | tail -5 | tee "$OUT/cuda-tests.txt"
[ "${DECODE:-1}" = 1 ] && timeout 120 python3 benchmarks/decode_tolerance.py --markdown "$OUT/decode-tolerance.md" \
    2>&1 | tail -12
if [ "${MODELS:-1}" = 1 ]; then
    extra=()
    [ "${GRAPHS:-1}" = 1 ] && extra+=(--graphs)
    [ -n "${ONLY:-}" ] && extra+=(--only "$ONLY")
    timeout 300 python3 benchmarks/models.py --suite gpu --reps 10 --budget 6 --dtypes "${DTYPES:-float32,bfloat16}" \
        "${extra[@]}" --json "$OUT/models.json" --markdown "$OUT/models.md" > "$OUT/models.log" 2>&1
    grep -v "^{" "$OUT/models.log" | tail -24
fi
[ "${PROFILE:-1}" = 1 ] && timeout 150 python3 benchmarks/profile_gpu.py --out "$OUT" > "$OUT/profile.log" 2>&1
[ "${E2E:-1}" = 1 ] && timeout 420 python3 benchmarks/e2e_gpu.py --out "$OUT" --duration "${E2E_SECONDS:-10}" --configs 1x0 \
    --pyspy 8 2>&1 | tail -8
[ -f "$OUT/pyspy-summary.txt" ] && head -40 "$OUT/pyspy-summary.txt"
exit 0
