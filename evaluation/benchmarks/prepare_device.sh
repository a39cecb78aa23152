#!/usr/bin/env bash
# Prepare, on a machine with PyPI, what gpu_run.sh needs on a GPU machine that has no network:
# wheels of the Python packages its image lacks and CLIP's tokenizer files, in .whl/ (ignored
# by git, carried to the GPU machine). The GPU image holds torch, transformers, peft,
# accelerate, safetensors, numpy, pandas, pillow, pyyaml, tqdm and zipp; diffusers and
# importlib_metadata (which diffusers imports) travel as wheels.
#
#     evaluation/benchmarks/prepare_device.sh      # then carry .whl to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
mkdir -p .git/info .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
DIFFUSERS=$("$PY" -c 'import diffusers; print(diffusers.__version__)')
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "diffusers==$DIFFUSERS" "importlib_metadata==8.7.0"
"$PY" -c 'from pathlib import Path; from palp.models.tiny import write_clip_tokenizer_files; write_clip_tokenizer_files(Path(".whl/tok"))'
ls -la .whl .whl/tok
