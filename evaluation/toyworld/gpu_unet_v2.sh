#!/usr/bin/env bash
# World v2's UNet stage on a GPU machine with no network (one call of a few minutes), after the
# data, vae, judge and clip stages ran on the CPU here (they take about 2 hours on 2 cores; the
# UNet stage about 6). Three steps:
#
#   here:   bash evaluation/toyworld/gpu_unet_v2.sh pack WORK
#           -> .v2carry/ (ignored by git): the VAE's checkpoint, names and recipe, and the wheels
#              and settings the GPU machine lacks. Carry .v2carry to the GPU machine.
#   there:  OUT=<folder whose files come back> bash evaluation/toyworld/gpu_unet_v2.sh run
#           renders the same pretraining data again (every core), encodes it with the carried VAE,
#           trains the UNet and text encoder, and writes them, with the VAE folder, as a tar split
#           into parts of 15 MiB (the GPU call returns at most 8 files of 16 MiB, 64 MiB in all),
#           plus log.txt and recipe.json.
#   here:   bash evaluation/toyworld/gpu_unet_v2.sh unpack FOLDER WORK
#           puts unet/, text_encoder/ and vae/ into WORK and the GPU run's unet records into
#           WORK/recipe.json; then `python evaluation/toyworld/pretrain.py export --world v2 --work WORK`.
#
# The run step's stage sizes default to pretrain_v2.py's; V2_FLAGS adds flags to every stage
# (e.g. "--n-train 48 --unet-steps 2 --unet-batch 4" to rehearse on a CPU), V2_DEVICE (default
# auto: cuda where there is one) the device, V2_WORKERS (default: every core) the rendering processes,
# V2_WORK (default /tmp/v2work) the GPU machine's working folder, V2_CARRY (default .v2carry) the carried one.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
carry=${V2_CARRY:-$repo/.v2carry}
cmd=${1:-}

case "$cmd" in
  pack)
    work=${2:?usage: gpu_unet_v2.sh pack WORK}
    for f in names.json recipe.json vae.ckpt; do
      [ -f "$work/$f" ] || { echo "gpu_unet_v2.sh: $work/$f is missing: run the data and vae stages first" >&2; exit 2; }
    done
    grep -qx '/.v2carry/' "$repo/.git/info/exclude" 2>/dev/null || echo '/.v2carry/' >>"$repo/.git/info/exclude"
    rm -rf "$carry" && mkdir -p "$carry/work" "$carry/whl"
    cp "$work/names.json" "$work/recipe.json" "$work/vae.ckpt" "$carry/work/"
    py=${PYTHON:-python3}
    [ -z "${PYTHON:-}" ] && [ -x "$repo/.venv/bin/python" ] && py=$repo/.venv/bin/python
    # What the GPU image lacks (its python is 3.12): diffusers and what it imports, open_clip
    # (CLIP's BPE vocabulary, for the tokenizer) and what it imports.
    pkgs=()
    for p in diffusers importlib_metadata zipp open_clip_torch ftfy wcwidth; do
      v=$("$py" -c "import importlib.metadata as m; print(m.version('$p'))")
      pkgs+=("$p==$v")
    done
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$carry/whl" "${pkgs[@]}"
    du -sh "$carry"
    ;;
  run)
    [ -f "$carry/work/vae.ckpt" ] || { echo "gpu_unet_v2.sh: no .v2carry/work/vae.ckpt here: pack it and carry .v2carry" >&2; exit 2; }
    out=${OUT:?set OUT: the folder whose files come back}
    mkdir -p "$out"
    if ls "$carry"/whl/*.whl >/dev/null 2>&1 && ! python3 -c 'import diffusers, open_clip' 2>/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/v2site "$carry"/whl/*.whl
      export PYTHONPATH=/tmp/v2site
    fi
    export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    work=${V2_WORK:-/tmp/v2work}
    mkdir -p "$work" && cp -n "$carry"/work/* "$work/"
    flags=(--work "$work" --device "${V2_DEVICE:-auto}" --workers "${V2_WORKERS:-$(nproc)}" ${V2_FLAGS:-})
    {
      command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
      python3 -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)'
      for stage in data vae unet; do
        start=$(date +%s)
        python3 "$repo/evaluation/toyworld/pretrain.py" "$stage" --world v2 "${flags[@]}"
        echo "[v2] stage $stage: $(( $(date +%s) - start )) s wall"
      done
    } 2>&1 | tr '\r' '\n' | grep -v '^\s*$' >"$out/log.txt"
    tar -C "$work" -cf - unet text_encoder vae | split -b 15M -d - "$out/weights.tar.part-"
    cp "$work/recipe.json" "$out/recipe.json"
    ls -la "$out"
    ;;
  unpack)
    from=${2:?usage: gpu_unet_v2.sh unpack FOLDER WORK}
    work=${3:?usage: gpu_unet_v2.sh unpack FOLDER WORK}
    ls "$from"/weights.tar.part-* >/dev/null || { echo "gpu_unet_v2.sh: no weights.tar.part-* in $from" >&2; exit 2; }
    cat "$from"/weights.tar.part-* | tar -C "$work" -xf - unet text_encoder vae
    python3 - "$from/recipe.json" "$work/recipe.json" <<'EOF'
import json, sys
gpu, here = (json.load(open(p)) for p in sys.argv[1:])
here.setdefault("stages", {})["unet"] = dict(gpu["stages"]["unet"], hardware=gpu.get("hardware"))
vae = here["stages"].setdefault("vae", {})
vae["latents_encoded_on"] = gpu.get("hardware")
for key in ("scaling_factor", "reconstruction_psnr_db"):
    if key in gpu["stages"].get("vae", {}):
        vae[key] = gpu["stages"]["vae"][key]
here.setdefault("history", []).extend(dict(h, hardware=gpu.get("hardware")) for h in gpu.get("history", [])
                                      if h["stage"] == "unet")
with open(sys.argv[2] + ".tmp", "w") as f:
    json.dump(here, f, indent=2)
import os
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
EOF
    echo "unpacked into $work: now python evaluation/toyworld/pretrain.py export --world v2 --work $work"
    ;;
  *)
    echo "usage: gpu_unet_v2.sh pack WORK | run | unpack FOLDER WORK" >&2
    exit 2
    ;;
esac
