"""The bodies of palp's KFP components: each only builds a ``palp`` command line and runs it
(the same code path as the CLI), then fills the typed output artifacts.

KFP serialises each function's source into the component, so every function imports what it
uses inside its body.
"""

from typing import List

from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output


def prepare(subjects: list, prompts: list, prompts_file: str, methods: list, pretrained_model: str, clip_model: str,
            clip_weights: str, prepared: Output[Dataset], inputs_fingerprint: str = "") -> list:
    """palp prepare; returns the trainings to fan out, ``{task_id, method, tasks}`` each
    (palp.prepare.fan_out: TI+DB once per subject, sampled on each of its tasks).

    ``inputs_fingerprint`` (a digest of the photos and prompts) only enters KFP's cache key,
    so that replaced photos under the same gs:// prefix give a fresh prepare."""
    from palp.cli import main
    from palp.config import split_method
    from palp.prepare import fan_out, load_manifest

    for m in methods:  # fail before any branch starts
        split_method(m)
    argv = ["prepare", "--output", prepared.path, "--pretrained-model", pretrained_model, "--clip", clip_model,
            "--clip-weights", clip_weights, "--inputs-fingerprint", inputs_fingerprint, "--pin-clip", "--quiet"]
    for s in subjects:
        argv += ["--subject", f"{s['name']}={s['images']}"]
        for key, flag in (("class_word", "--class-word"), ("placeholder", "--placeholder"),
                          ("personalization_prompt", "--personalization-prompt")):
            if s.get(key):
                argv += [flag, f"{s['name']}={s[key]}"]
    for p in prompts:
        argv += ["--prompt", p]
    if prompts_file:
        argv += ["--prompts-file", prompts_file]
    main(argv, raise_errors=True)
    manifest = load_manifest(prepared.path)
    prepared.metadata.update({"tasks": [t["id"] for t in manifest["tasks"]], "subjects": [s["name"] for s in subjects]})
    return fan_out(manifest, methods)


def train(prepared: Input[Dataset], task: str, method: str, pretrained_model: str, steps: int, batch_size: int,
          micro_batch_size: int, lr: float, lora_rank: int, save_steps: str, checkpoint_every: int, mixed_precision: str,
          seed: int, model: Output[Model], lora_targets: str = "attention"):
    """palp train --prepared, always with --resume: a retried (preempted) task continues from
    the checkpoints it left in its output."""
    from palp.cli import main
    from palp.config import split_method

    base_method, noise = split_method(method)  # "palp-iid": PALP with i.i.d. re-noising
    argv = ["train", "--prepared", prepared.path, "--task", task, "--method", base_method, "--noise", noise,
            "--pretrained-model", pretrained_model,
            "--steps", str(steps), "--batch-size", str(batch_size), "--lr", str(lr), "--lora-rank", str(lora_rank),
            "--lora-targets", lora_targets, "--save-steps", save_steps, "--checkpoint-every", str(checkpoint_every), "--mixed-precision", mixed_precision,
            "--seed", str(seed), "--output", model.path, "--resume", "--quiet"]
    if micro_batch_size > 0:
        argv += ["--micro-batch-size", str(micro_batch_size)]
    main(argv, raise_errors=True)
    model.metadata.update({"task": task, "method": method, "steps": steps, "framework": "diffusers-lora"})


def sample(model: Input[Model], prepared: Input[Dataset], tasks: list, num_samples: int, steps: int, batch_size: int,
           scheduler: str, guidance: float, checkpoints: str, reference: bool, seed: int, samples: Output[Dataset]):
    """palp sample of the trained run on each of its ``tasks`` (and, with ``reference``, of its
    base model on their clean prompts)."""
    from palp.cli import main

    argv = ["sample", "--model", model.path, "--prepared", prepared.path, "--output", samples.path, "--num-samples",
            str(num_samples), "--steps", str(steps), "--batch-size", str(batch_size), "--scheduler", scheduler,
            "--guidance", str(guidance), "--seed", str(seed), "--quiet"]
    for t in tasks:
        argv += ["--task", t]
    main(argv + ["--checkpoints", checkpoints], raise_errors=True)
    if reference:
        main(argv + ["--reference"], raise_errors=True)
    samples.metadata.update({"tasks": tasks, "num_samples": num_samples, "steps": steps, "scheduler": scheduler})


def score(samples: Input[Dataset], prepared: Input[Dataset], clip_model: str, clip_weights: str, judge: str,
          scores: Output[Dataset], metrics: Output[Metrics], table: Output[Markdown], report: Output[HTML]):
    """palp score of one branch: its Table 2 row, metrics and report."""
    import json
    import os
    import shutil

    from palp.cli import main

    main(["score", "--samples", samples.path, "--prepared", prepared.path, "--output", scores.path, "--clip", clip_model,
          "--clip-weights", clip_weights, "--judge", judge, "--quiet"], raise_errors=True)
    with open(os.path.join(scores.path, "metrics.json")) as f:
        for name, value in json.load(f).items():
            metrics.log_metric(name, value)
    shutil.copyfile(os.path.join(scores.path, "table2.md"), table.path)
    shutil.copyfile(os.path.join(scores.path, "report.html"), report.path)


def compare(samples: Input[List[Dataset]], prepared: Input[Dataset], clip_model: str, clip_weights: str, judge: str, forms: int,
            study_seed: int, study_image_size: int, scores: Output[Dataset], metrics: Output[Metrics],
            table: Output[Markdown], report: Output[HTML], study: Output[Dataset]):
    """Every branch together: the Table-2 comparison across methods, its report, the study forms."""
    import json
    import os
    import shutil

    from palp.cli import main

    dirs = [s.path for s in samples]
    argv = ["score", "--prepared", prepared.path, "--output", scores.path, "--clip", clip_model, "--clip-weights",
            clip_weights, "--judge", judge, "--quiet"]
    for d in dirs:
        argv += ["--samples", d]
    main(argv, raise_errors=True)
    with open(os.path.join(scores.path, "metrics.json")) as f:
        for name, value in json.load(f).items():
            metrics.log_metric(name, value)
    shutil.copyfile(os.path.join(scores.path, "table2.md"), table.path)
    shutil.copyfile(os.path.join(scores.path, "report.html"), report.path)
    argv = ["study", "export", "--prepared", prepared.path, "--output", study.path, "--forms", str(forms), "--seed",
            str(study_seed), "--image-size", str(study_image_size)]
    for d in dirs:
        argv += ["--samples", d]
    main(argv, raise_errors=True)
