"""The toy-world experiment's committed CLIP text scores against a rerun's, run by run.

The committed compare-step scores (results/text-fault/scores.csv.gz) looked each sample's clean prompt up by
its prompt with [V], so subjects sharing a prompt were scored against the last subject's class
word. Each pipeline branch's own score step saw one subject and was right. This compares the
committed rows with a rerun's per-branch scores (each sample's own texts), on the runs the
rerun finished:

    python evaluation/toyworld/clip_text_correction.py PIPELINE_ROOT
"""
import glob
import sys
from pathlib import Path

import pandas as pd

from palp.core.safecsv import read_csv

old = pd.read_csv(str(Path(__file__).parent / "results" / "text-fault" / "scores.csv.gz"), keep_default_na=False)
new = pd.concat([read_csv(open(f, "rb").read()) for f in sorted(glob.glob(sys.argv[1] + "/*/for-loop-1-iteration-*/score/scores/scores.csv"))])
new = new[new["method"] != "base"]
key = ["task", "method", "step", "prompt", "sample"]
m = old.merge(new, on=key, suffixes=("_old", "_new"))
print(f"runs finished: {new.groupby(['task', 'method']).ngroups} of 100; matched images: {len(m)} of {len(new)}")
same = {c: float((m[c + "_old"] - m[c + "_new"]).abs().max()) for c in ["Style", "Ambiance 1", "Image alignment", "Judge: identity", "Judge: class"]}
print("max |old - new| of columns whose text did not change (how far the rerun's images moved):", {k: f"{v:.1e}" for k, v in same.items()})
own = m["clean_prompt_old"] == m["clean_prompt_new"]
print(f"rows whose committed clean prompt equals their own: {own.mean():.3f}")
final = m[m["step"] == 500]
rows = []
for meth, g in final.groupby("method"):
    rows.append({"method": meth, "n": len(g), "Target prompt old": g["Target prompt_old"].mean(), "Target prompt new": g["Target prompt_new"].mean(),
                 "Class old": g["Class_old"].mean(), "Class new": g["Class_new"].mean()})
print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))
# Which subject's class word did the committed score use? The last subject scored per prompt.
print("per task (step 500, all methods): Target prompt old -> new")
print(final.groupby("task")[["Target prompt_old", "Target prompt_new"]].mean().round(3).to_markdown())
print("paired by task, method minus TI+DB at step 500 (tasks where both finished):")
per = final.groupby(["task", "method"])[["Target prompt_old", "Target prompt_new"]].mean().unstack("method")
out = []
for meth in ["palp", "palp-iid", "sds"]:
    both = per.dropna(subset=[("Target prompt_old", meth), ("Target prompt_old", "ti-db")])
    d_old = (both[("Target prompt_old", meth)] - both[("Target prompt_old", "ti-db")])
    d_new = (both[("Target prompt_new", meth)] - both[("Target prompt_new", "ti-db")])
    out.append({"method": meth, "tasks": len(both), "old": d_old.mean(), "new": d_new.mean()})
print(pd.DataFrame(out).to_markdown(index=False, floatfmt="+.3f"))
