#!/usr/bin/env bash
# Does TI+DB forget the prompt when pushed? The two development subjects of the frontier
# experiment (purple-cat, pink-robot) x two of the experiment's prompts, TI+DB for 2000 steps
# at each learning rate given (batch 2, LoRA rank 32), snapshots at 250/500/1000/2000 steps,
# 6 samples per snapshot and prompt (DDIM 20, CFG 7.5), read by the judge. Both subjects train
# side by side, a thread each: about 3 min per learning rate on 2 cores.
#
#     evaluation/toyworld/forgetting.sh OUT_DIR 1e-3 5e-3 2e-2
set -euo pipefail
D=${1:?usage: $0 OUT_DIR LR [LR ...]}; shift
[ $# -gt 0 ] || { echo "give at least one learning rate" >&2; exit 2; }
[ -e "$D" ] && { echo "$D exists: give a new folder" >&2; exit 2; }
mkdir -p "$D"; D=$(cd "$D" && pwd)
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
palp prepare --subject purple-cat=examples/toyworld/purple-cat --class-word purple-cat=cat \
  --subject pink-robot=examples/toyworld/pink-robot --class-word pink-robot=robot \
  --prompt "A sketch of [V] in the snow at night" --prompt "A watercolour of [V] on the beach at sunset" \
  --pretrained-model toyworld --clip toyworld --output $D/prep --quiet
run() {  # lr subject
  local o=$D/tidb-$1-$2
  palp train --prepared $D/prep --task $2-00 --pretrained-model toyworld --method ti-db --steps 2000 --batch-size 2 \
    --lr $1 --lora-rank 32 --save-steps 250,500,1000,2000 --checkpoint-every 1000 --output $o --quiet
  palp sample --model $o --prepared $D/prep --task $2-00 --task $2-01 --output $D/samples-$1-$2 --num-samples 6 --steps 20 \
    --checkpoints all --quiet
}
for lr in "$@"; do run $lr purple-cat & run $lr pink-robot; wait; done
palp score $(for f in $D/samples-*; do echo --samples $f; done) --prepared $D/prep --output $D/scores --clip toyworld --judge toyworld --quiet
python - "$D" <<'PY'
import sys
from pathlib import Path
from palp.safecsv import read_csv
d = read_csv(Path(f"{sys.argv[1]}/scores/scores.csv").read_bytes())
d["lr"] = d["run"].str.extract(r"tidb-([0-9e.+-]+)-(?:purple-cat|pink-robot)")[0]
d["Elements found"] = d[["Judge: style", "Judge: place", "Judge: time"]].mean(axis=1)
cols = ["Elements found", "Judge: style", "Judge: place", "Judge: time", "Judge: class", "Judge: identity"]
print(d.groupby(["lr", "step"])[cols].mean().round(3).to_markdown())
print(d.groupby(["lr", "step", "prompt"])[["Elements found", "Judge: identity"]].mean().round(3).to_markdown())
PY
