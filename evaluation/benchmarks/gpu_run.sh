#!/usr/bin/env bash
# One prepared GPU run of palp's benchmarks; JSON, logs and tables land in $OUT.
#
#     evaluation/benchmarks/gpu_run.sh          # both benchmarks, 8-9 minutes on an H200
#     evaluation/benchmarks/gpu_run.sh run      # whole palp train runs, about 4 minutes
#     evaluation/benchmarks/gpu_run.sh sdxl     # the SDXL-shaped step at 1024 px (random weights, written
#                                               # once to /tmp: about 14 GB), SDXL_BATCH rows (default 4)
#
# Environment: OUT; TRAIN_VARIANTS / SAMPLE_VARIANTS (space-separated, default: each script's
# list); TRAIN_LIMIT / SAMPLE_LIMIT / RUN_LIMIT (seconds, default 330 / 200 / 330); RUN_STEPS,
# RUN_WARM_STEPS. The random SD-1.4-shaped model is written once to /tmp and reused by later
# calls on the same machine.
# Prepare first, where PyPI is reachable: evaluation/benchmarks/prepare_device.sh (writes .whl/,
# which the GPU machine needs: carry it). Each benchmark has its own time limit and writes
# its JSON after every variant, so a run cut short still reports what it measured.
#   bench: train_step.py (naive TI+DB and PALP steps vs palp's, eager and compiled, batch 32,
#          512px) and sampling.py (stock pipeline vs palp's sampler, batch 16, 50 DDIM steps).
#   run:   a RUN_STEPS-step palp train run (default 60) from an empty compile cache, then a
#          RUN_WARM_STEPS-step run (default 10) that loads the first one's compile cache, each
#          in a fresh process, timed start to finish; each extrapolated to 500 steps.
set -uo pipefail
cd "$(dirname "$0")/../.."
PHASE=${1:-bench}
OUT=${OUT:-/tmp/palp-bench}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/palp-inductor}
TOK=(); [ -f .whl/tok/vocab.json ] && TOK=(--tokenizer .whl/tok)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, diffusers, peft, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "peft", peft.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/gpu.txt"

case "$PHASE" in
  bench)
    TV=(); [ -n "${TRAIN_VARIANTS:-}" ] && TV=(--variants $TRAIN_VARIANTS)
    SV=(); [ -n "${SAMPLE_VARIANTS:-}" ] && SV=(--variants $SAMPLE_VARIANTS)
    timeout "${TRAIN_LIMIT:-330}" python3 evaluation/benchmarks/train_step.py "${TOK[@]}" "${TV[@]}" --out "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.log"
    timeout "${SAMPLE_LIMIT:-200}" python3 evaluation/benchmarks/sampling.py "${TOK[@]}" "${SV[@]}" --out "$OUT/sampling.json" 2>&1 | tee "$OUT/sampling.log"
    ;;
  run)
    timeout "${RUN_LIMIT:-330}" python3 evaluation/benchmarks/train_step.py "${TOK[@]}" --variants --run-steps "${RUN_STEPS:-60}" \
      --run-warm-steps "${RUN_WARM_STEPS:-10}" --out "$OUT/train_run.json" 2>&1 | tee "$OUT/train_run.log"
    ;;
  sdxl)
    timeout "${SDXL_LIMIT:-420}" python3 evaluation/benchmarks/train_step.py "${TOK[@]}" --family sdxl --batch "${SDXL_BATCH:-4}" \
      --variants ${SDXL_VARIANTS:-naive-db db palp} --out "$OUT/train_step_sdxl.json" 2>&1 | tee "$OUT/train_step_sdxl.log"
    ;;
  *) echo "usage: $0 [bench|run|sdxl]" >&2; exit 2 ;;
esac
