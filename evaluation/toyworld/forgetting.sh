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
here=$(cd "$(dirname "$0")" && pwd)
"$here/frontier_dev.sh" "$D" $(for lr in "$@"; do echo "ti-db:$lr"; done) > /dev/null  # trains, samples and scores
python - "$D" <<'PY'
import sys
from pathlib import Path
from palp.core.safecsv import read_csv
d = read_csv(Path(f"{sys.argv[1]}/scores/scores.csv").read_bytes())
d["lr"] = d["run"].str.extract(r"ti-db~([0-9e.+-]+)~")[0]  # every (subject, prompt), not only frontier_dev.sh's units
d["Elements found"] = d[["Judge: style", "Judge: place", "Judge: time"]].mean(axis=1)
cols = ["Elements found", "Judge: style", "Judge: place", "Judge: time", "Judge: class", "Judge: identity"]
print(d.groupby(["lr", "step"])[cols].mean().round(3).to_markdown())
print(d.groupby(["lr", "step", "prompt"])[["Elements found", "Judge: identity"]].mean().round(3).to_markdown())
PY
