#!/usr/bin/env bash
# The frontier experiment's held-out sweep: every config in this folder (or the ones given),
# each through `palp pipeline run-local` into a pipeline root of its own under OUT_DIR, in two
# queues side by side (kfp.local runs two trainings of a run at once: four one-thread steps on
# 2 cores), then the frontier report over all of them. PROTOCOL.md says what is run and why.
#
#     evaluation/toyworld/frontier/run.sh OUT_DIR [CONFIG.yaml ...]
set -euo pipefail
D=${1:?usage: $0 OUT_DIR [CONFIG.yaml ...]}; shift
here=$(cd "$(dirname "$0")" && pwd)
configs=("$@"); [ ${#configs[@]} -gt 0 ] || configs=("$here"/heldout-*.yaml)
mkdir -p "$D"; D=$(cd "$D" && pwd)
export OMP_NUM_THREADS=1
queue() {
  for c in "$@"; do
    local name; name=$(basename "$c" .yaml)
    if [ -e "$D/$name/done" ]; then echo "$name: done already"; continue; fi  # a rerun skips what finished
    rm -rf "$D/$name"
    local t0=$SECONDS
    palp pipeline run-local --config "$c" --pipeline-root "$D/$name" > "$D/$name.log" 2>&1 || { echo "$name FAILED: $D/$name.log" >&2; return 1; }
    echo "$((SECONDS - t0))" > "$D/$name/done"; echo "$name: $((SECONDS - t0)) s"
  done
}
a=() b=()
for i in "${!configs[@]}"; do if (( i % 2 == 0 )); then a+=("${configs[$i]}"); else b+=("${configs[$i]}"); fi; done
t0=$SECONDS
queue "${a[@]}" & pa=$!
status=0
[ ${#b[@]} -eq 0 ] || queue "${b[@]}" || status=1
wait $pa || status=1
[ $status -eq 0 ] || exit 1
echo "sweep: $((SECONDS - t0)) s"
python "$here/../frontier.py" --root $(for c in "${configs[@]}"; do echo "$D/$(basename "$c" .yaml)"; done) --out "$D/report" --baseline-lr 3e-3 --match-step 500  # the protocol's matched point
