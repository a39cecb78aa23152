"""The bodies of palp's KFP components: each calls the palp library's entry point for its step
with the typed parameters it received (the same functions the CLI calls), then fills the
typed output artifacts.

KFP serialises each function's source into the component, so every function imports what it
uses inside its body.
"""

from typing import List

from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output


def prepare(subjects: list, prompts: list, prompts_file: str, methods: list, pretrained_model: str, clip_model: str,
            clip_weights: str, prepared: Output[Dataset], inputs_fingerprint: str = "") -> list:
    """palp prepare; returns the trainings to fan out, ``{task_id, method, tasks}`` each
    (palp.steps.prepare.fan_out: TI+DB once per subject, sampled on each of its tasks).

    ``inputs_fingerprint`` (a digest of the photos and prompts) only enters KFP's cache key,
    so that replaced photos under the same gs:// prefix give a fresh prepare."""
    from palp.core.settings import split_method
    from palp.steps.prepare import PromptSpec, fan_out, load_prompts_file
    from palp.steps.prepare import prepare as prepare_dataset
    from palp.steps.prepare import subject_specs

    for m in methods:  # fail before any branch starts
        split_method(m)
    specs = subject_specs(subjects)
    texts = [PromptSpec(p) for p in prompts] + (load_prompts_file(prompts_file) if prompts_file else [])
    manifest = prepare_dataset(specs, texts, prepared.path, pretrained_model=pretrained_model, clip_model=clip_model,
                               clip_weights=clip_weights, inputs_fingerprint=inputs_fingerprint, pin_clip=True, progress=False)
    prepared.metadata.update({"tasks": [t["id"] for t in manifest["tasks"]], "subjects": [s["name"] for s in subjects]})
    return fan_out(manifest, methods)


# Longer than most functions here: its parameter list is the component's interface, which KFP
# reads from the signature (a comment, not the docstring: the function's source is in the compiled YAML).
def train(prepared: Input[Dataset], task: str, method: str, pretrained_model: str, steps: int, batch_size: int,
          micro_batch_size: int, lr: float, lora_rank: int, save_steps: str, checkpoint_every: int, mixed_precision: str,
          seed: int, model: Output[Model], metrics: Output[Metrics], report: Output[HTML], lora_targets: str = "attention",
          validation_every: int = 0, lam: float = 1.0, processes: int = 1, alpha: float = 15.0, beta: float = 7.5,
          prior_preservation: bool = False, prior_weight: float = 0.0, num_class_images: int = 0):
    """palp train of one prepared task, always resuming: a retried (preempted) task continues
    from the checkpoints it left in its output. Its page (the curves and, with
    ``validation_every``, the validation grids) is the ``report``; its final scalars the ``metrics``.
    ``lam`` is the alignment term's weight (--lambda; TI+DB has no such term and ignores it);
    ``alpha`` and ``beta`` its guidance scales (--alpha, --beta: 7.5 and 1 for composition).
    ``processes``: one per accelerator the step was given; the global batch is split across them
    (palp.steps.launch). ``prior_preservation``: DreamBooth's prior-preservation loss
    (--prior-preservation), with ``prior_weight`` and ``num_class_images`` (0: the library's default).
    ``method`` is a variant (``palp-iid``, ``palp+custom-diffusion``, ``custom-diffusion``, ``p-plus``, ``neti``): 0 for
    ``steps``, ``batch_size``, ``lr``, ``lora_rank`` and False for ``prior_preservation`` take the
    method's defaults; the LoRA settings apply to LoRA runs only, ``prior_weight`` and
    ``num_class_images`` to runs with prior preservation (given, or the method's default)."""
    import os
    import shutil
    from pathlib import Path

    from palp.core.settings import parse_steps, split_variant
    from palp.models.run_weights import METRICS_FILE, REPORT_FILE, read_metrics_csv
    from palp.steps.launch import train_in_processes
    from palp.steps.prepare import task_config
    from palp.steps.run_page import final_scalars

    from palp.core.methods import METHOD_TABLE

    base_method, noise, personalize = split_variant(method)  # "palp-iid": i.i.d. re-noising; "+custom-diffusion"
    lora = personalize == "lora-token"
    own_prior = METHOD_TABLE[base_method].defaults.get("prior_preservation")
    prior = bool(prior_preservation or (own_prior is not None and own_prior.value))  # given, or the method's default
    cfg = task_config(prepared.path, task, method=base_method, noise=noise, personalize=personalize,
                      pretrained_model=pretrained_model, steps=steps or None, batch_size=batch_size or None,
                      micro_batch_size=micro_batch_size or None, lr=lr or None, lam=lam,
                      lora_rank=(lora_rank or None) if lora else None, lora_targets=lora_targets if lora else "attention",
                      alpha=alpha, beta=beta, save_steps=parse_steps(save_steps),
                      checkpoint_every=checkpoint_every, mixed_precision=mixed_precision, seed=seed,
                      validation_every=validation_every, prior_preservation=prior,
                      prior_weight=(prior_weight or None) if prior else None,
                      num_class_images=(num_class_images or None) if prior else None, output=model.path)
    from palp.core.preemption import Preempted

    try:
        train_in_processes(cfg, processes, resume=True, progress=False)
    except Preempted as e:  # SIGTERM: the step it was on checkpointed; exit 128 + signal, and the retry resumes
        print(e, flush=True)
        raise SystemExit(e.exit_code) from None
    model.metadata.update({"task": task, "method": method, "steps": cfg.steps,
                           "framework": {"lora-token": "diffusers-lora", "custom-diffusion": "diffusers-custom-diffusion"}
                           .get(personalize, f"palp-{personalize}")})  # P+ and NeTI: palp's layered_tokens file
    for name, value in final_scalars(read_metrics_csv(Path(model.path, METRICS_FILE))).items():
        metrics.log_metric(name, value)
    shutil.copyfile(os.path.join(model.path, REPORT_FILE), report.path)


def sample(model: Input[Model], prepared: Input[Dataset], tasks: list, num_samples: int, steps: int, batch_size: int,
           scheduler: str, guidance: float, checkpoints: str, reference: bool, seed: int, samples: Output[Dataset]):
    """palp sample of the trained run on each of its ``tasks`` (and, with ``reference``, of its
    base model on their clean prompts)."""
    from palp.core.preemption import Preempted
    from palp.steps.sample import sample as sample_run

    settings = dict(prepared=prepared.path, tasks=tasks, num_samples=num_samples, steps=steps, batch_size=batch_size,
                    scheduler=scheduler, guidance=guidance, seed=seed, progress=False)
    try:
        sample_run(model.path, samples.path, checkpoints=checkpoints, **settings)
        if reference:
            sample_run(model.path, samples.path, reference=True, **settings)
    except Preempted as e:  # SIGTERM: finished images kept; exit 128 + signal, and the retry makes the rest
        print(e, flush=True)
        raise SystemExit(e.exit_code) from None
    samples.metadata.update({"tasks": tasks, "num_samples": num_samples, "steps": steps, "scheduler": scheduler})


def score(samples: Input[Dataset], prepared: Input[Dataset], clip_model: str, clip_weights: str, judge: str,
          scores: Output[Dataset], metrics: Output[Metrics], table: Output[Markdown], report: Output[HTML]):
    """palp score of one branch: its Table 2 row, metrics and report."""
    from palp.steps.score import hand_over
    from palp.steps.score import score as score_run

    score_run([samples.path], prepared.path, scores.path, clip_model=clip_model, clip_weights=clip_weights, judge=judge,
              progress=False)
    hand_over(scores.path, log_metric=metrics.log_metric, table=table.path, report=report.path)


def compare(samples: Input[List[Dataset]], prepared: Input[Dataset], clip_model: str, clip_weights: str, judge: str, forms: int,
            study_seed: int, study_image_size: int, scores: Output[Dataset], metrics: Output[Metrics],
            table: Output[Markdown], report: Output[HTML], study: Output[Dataset]):
    """Every branch together: the Table-2 comparison across methods, its report, the study forms."""
    from palp.steps.score import hand_over
    from palp.steps.score import score as score_run
    from palp.steps.study import export

    dirs = [s.path for s in samples]
    score_run(dirs, prepared.path, scores.path, clip_model=clip_model, clip_weights=clip_weights, judge=judge, progress=False)
    hand_over(scores.path, log_metric=metrics.log_metric, table=table.path, report=report.path)

    export(dirs, prepared.path, study.path, forms=forms, seed=study_seed, image_size=study_image_size)
