#!/usr/bin/env bash
# Development runs of the frontier experiment: the two development subjects (purple-cat,
# pink-robot) only, the held-out four untouched. Each SPEC is METHOD:LR[:LAMBDA] (method
# ti-db, palp, palp-iid or sds), trained for 2000 steps (batch 2, LoRA rank 32) with snapshots
# at 250/500/1000/2000, 6 samples per snapshot and prompt (DDIM 20, CFG 7.5), read by the judge.
# TI+DB trains once per subject and is sampled on both prompts; the alignment methods train
# purple-cat x "A sketch of [V] in the snow at night" and pink-robot x "A watercolour of [V] on
# the beach at sunset". The two runs of a spec go side by side, a thread each.
#
#     evaluation/toyworld/frontier_dev.sh OUT_DIR ti-db:3e-3 palp:3e-3:0.3 palp:3e-3:1
set -euo pipefail
D=${1:?usage: $0 OUT_DIR METHOD:LR[:LAMBDA] ...}; shift
[ $# -gt 0 ] || { echo "give at least one METHOD:LR[:LAMBDA]" >&2; exit 2; }
[ -e "$D" ] && { echo "$D exists: give a new folder" >&2; exit 2; }
mkdir -p "$D"; D=$(cd "$D" && pwd)
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
palp prepare --subject purple-cat=examples/toyworld/purple-cat --class-word purple-cat=cat --truth purple-cat=examples/toyworld/purple-cat.json \
  --subject pink-robot=examples/toyworld/pink-robot --class-word pink-robot=robot --truth pink-robot=examples/toyworld/pink-robot.json \
  --prompt "A sketch of [V] in the snow at night" --prompt "A watercolour of [V] on the beach at sunset" \
  --pretrained-model toyworld --clip toyworld --output $D/prep --quiet
run() {  # name method lr lambda task sample-task...
  local name=$1 method=$2 lr=$3 lam=$4 task=$5; shift 5
  local flags=(--method ${method%-iid})
  [ "$method" = "${method%-iid}" ] || flags+=(--noise iid)
  palp train --prepared $D/prep --task $task --pretrained-model toyworld "${flags[@]}" --lambda $lam --steps 2000 \
    --batch-size 2 --lr $lr --lora-rank 32 --save-steps 250,500,1000,2000 --checkpoint-every 1000 --output $D/$name --quiet
  palp sample --model $D/$name --prepared $D/prep $(for t in "$@"; do echo --task $t; done) --output $D/samples-$name \
    --num-samples 6 --steps 20 --checkpoints all --quiet
}
for spec in "$@"; do
  IFS=: read -r method lr lam <<<"$spec"; lam=${lam:-1}
  case $method in ti-db|palp|palp-iid|sds) ;; *) echo "unknown method in $spec" >&2; exit 2;; esac
  s="$method~$lr~$lam"
  if [ $method = ti-db ]; then
    run "$s~purple-cat" $method $lr $lam purple-cat-00 purple-cat-00 purple-cat-01 &
    run "$s~pink-robot" $method $lr $lam pink-robot-00 pink-robot-00 pink-robot-01
  else
    run "$s~purple-cat" $method $lr $lam purple-cat-00 purple-cat-00 &
    run "$s~pink-robot" $method $lr $lam pink-robot-01 pink-robot-01
  fi
  wait
done
palp score $(for f in $D/samples-*; do echo --samples $f; done) --prepared $D/prep --output $D/scores --clip toyworld --judge toyworld --quiet
python - "$D" <<'PY'
import sys
from pathlib import Path
from palp.core.safecsv import read_csv
d = read_csv(Path(f"{sys.argv[1]}/scores/scores.csv").read_bytes())
d["setting"] = d["run"].str.extract(r"([a-z-]+~[0-9e.+-]+~[0-9e.+-]+)~")[0]
# only the alignment tasks' prompts count, so TI+DB is read on the same (subject, prompt) pairs
d = d[((d["subject"] == "purple-cat") & d["prompt"].str.contains("sketch")) | ((d["subject"] == "pink-robot") & d["prompt"].str.contains("watercolour"))]
d["Elements found"] = d[["Judge: style", "Judge: place", "Judge: time"]].mean(axis=1)
cols = ["Elements found", "Judge: style", "Judge: place", "Judge: time", "Judge: class", "Judge: identity", "Target prompt"]
print(d.groupby(["setting", "step"])[cols].mean().round(3).to_markdown())
PY
