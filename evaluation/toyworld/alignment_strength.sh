#!/usr/bin/env bash
# Does a weaker alignment term keep PALP's prompt alignment in the toy world? Two tasks of the
# experiment (purple-cat and pink-robot x "A sketch of [V] in the snow at night"), PALP with the
# experiment's recipe but lambda 0.3, or alpha 7.5; 6 final samples each, scored by the judge.
# The two tasks train side by side, a thread each (about 4 min on 2 cores).
#
#     evaluation/toyworld/alignment_strength.sh OUT_DIR
set -euo pipefail
D=${1:?usage: $0 OUT_DIR}
[ -e "$D" ] && { echo "$D exists: give a new folder" >&2; exit 2; }
mkdir -p "$D"; D=$(cd "$D" && pwd)
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
P="A sketch of [V] in the snow at night"
palp prepare --subject purple-cat=examples/toyworld/purple-cat --class-word purple-cat=cat --truth purple-cat=examples/toyworld/purple-cat.json \
  --subject pink-robot=examples/toyworld/pink-robot --class-word pink-robot=robot --truth pink-robot=examples/toyworld/pink-robot.json --prompt "$P" \
  --pretrained-model toyworld --clip toyworld --output $D/prep --quiet
run() {  # name task extra...
  local name=$1 task=$2; shift 2
  palp train --prepared $D/prep --task $task --pretrained-model toyworld --method palp --steps 500 --batch-size 2 \
    --lr 1e-3 --lora-rank 32 --save-steps 500 --output $D/$name-$task --quiet "$@"
  palp sample --model $D/$name-$task --output $D/samples-$name-$task --num-samples 6 --steps 20 --quiet
}
for v in "lam03 --lambda 0.3" "alpha75 --alpha 7.5"; do
  set -- $v; name=$1; shift
  run $name purple-cat-00 "$@" & run $name pink-robot-00 "$@"; wait
done
palp score $(for f in $D/samples-*; do echo --samples $f; done) --prepared $D/prep --output $D/scores --clip toyworld --judge toyworld --quiet
python - "$D" <<'PY'
import sys
from pathlib import Path
from palp.core.safecsv import read_csv
d = read_csv(Path(f"{sys.argv[1]}/scores/scores.csv").read_bytes())
d["variant"] = d["run"].str.extract(r"/(lam03|alpha75)-")[0]
cols = ["Judge: style", "Judge: place", "Judge: time", "Judge: class", "Judge: identity", "Target prompt"]
print(d.groupby(["variant", "subject"])[cols].mean().round(3).to_markdown())
print(d.groupby(["variant"])[cols].mean().round(3).to_markdown())
PY
