"""XLA compilations per training step: `palp.steps.train.train` (what `palp train` runs) on the tiny model
on torch_xla's device, with torch_xla's metrics read around every step and validation check.

    PJRT_DEVICE=CPU python evaluation/benchmarks/xla_train_steps.py [--steps 6] [--output DIR]
        [--validation-every 2] [--checkpoint-every 2] [--resume]

A step should compile only in the first steps (step 1: the forward/backward graph and the
first update, which creates AdamW's state; step 2: the update with that state; on XLA:CPU also
the graph before the CPU fallback of upsample_nearest2d_backward, which torch_xla lowers on TPU
only), then run its graphs from the cache: 0 compilations per step from step 3 on.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch_xla.debug.metrics as met  # noqa: E402

import palp.steps.train as T  # noqa: E402
from palp.core.settings import Subject, TrainConfig  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "subjects" / "cat"


def counters() -> tuple[int, float, int, int]:
    """(compilations, compile seconds, executions, aten ops run on the CPU as fallbacks) so far."""
    c, e = met.metric_data("CompileTime"), met.metric_data("ExecuteTime")
    fallbacks = sum(met.counter_value(k) or 0 for k in met.counter_names() if k.startswith("aten::"))
    return (c[0] if c else 0), (c[1] / 1e9 if c else 0.0), (e[0] if e else 0), fallbacks


def measured(what: str, fn):
    def wrapper(*args, **kwargs):
        a, t0 = counters(), time.perf_counter()
        result = fn(*args, **kwargs)
        b = counters()
        label = what(args, result)
        print(f"{label}: compilations {b[0] - a[0]} ({b[1] - a[1]:.1f} s), executions {b[2] - a[2]}, "
              f"CPU fallbacks {b[3] - a[3]}, wall {time.perf_counter() - t0:.2f} s", flush=True)
        return result
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--output", default="")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--validation-every", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    T._step = measured(lambda a, r: f"step {a[4]} (loss {r['loss']:.7f})", T._step)
    T._validate = measured(lambda a, r: f"validation at step {a[1]}", T._validate)
    cfg = TrainConfig(subjects=[Subject("[V]", str(EXAMPLE), "cat")], target_prompt="A sketch of [V] in Paris at night",
                      output=args.output or tempfile.mkdtemp(prefix="palp-xla-"), pretrained_model="tiny",
                      batch_size=args.batch_size, steps=args.steps, validation_every=args.validation_every,
                      checkpoint_every=args.checkpoint_every, report_to="none")
    a, t0 = counters(), time.perf_counter()
    T.train(cfg, progress=False, resume=args.resume)
    b = counters()
    print(f"whole run: {time.perf_counter() - t0:.1f} s, compilations {b[0] - a[0]} ({b[1] - a[1]:.1f} s); "
          f"CPU fallbacks {[k for k in met.counter_names() if k.startswith('aten::')]} -> {cfg.output}")


if __name__ == "__main__":
    main()
