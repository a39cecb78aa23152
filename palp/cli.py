"""``palp`` command line. ``main(argv)`` only parses and calls the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from palp import __version__
from palp.core.flags import arguments, finite_float, settings


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless the help states it already or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def _add_flags(parser, cls, sections=None, **choices) -> None:
    """The flags of the settings dataclass ``cls`` (palp.core.flags), each in its --help section."""
    for section, name, keywords in arguments(cls, **choices):
        (sections[section] if section else parser).add_argument(name, **keywords)


def add_train_parser(sub) -> None:
    """The task's flags (subjects and prompts, assembled by ``config_from_args``), then every
    TrainConfig flag, each in its section."""
    from palp.core.settings import CHECKPOINTS, SUBJECT, TRAIN_SECTIONS, TrainConfig

    p = sub.add_parser("train", help="fine-tune LoRA + [V] on a subject with prompt-aligned guidance",
                       formatter_class=_HelpFormatter)
    sections = {title: p.add_argument_group(title) for title in TRAIN_SECTIONS}
    g = sections[SUBJECT]
    g.add_argument("--prepared", help="a dataset written by `palp prepare` (folder or gs:// prefix)")
    g.add_argument("--task", help="with --prepared: the task id to train (needed when it holds several)")
    g.add_argument("--images", action="append", metavar="[V]=DIR",
                   help="folder of subject photos; repeat as --images '[V1]=DIR' for several subjects")
    g.add_argument("--class-word", action="append", metavar="[V]=WORD",
                   help="class word of the subject (cat); '[V2]=dog' for a named subject")
    g.add_argument("--prompt", help="target prompt, e.g. 'A sketch of [V] in Paris at night'")
    g.add_argument("--personalization-prompt", action="append", metavar="[V]=PROMPT",
                   help="personalization prompt y_P per subject (default 'A photo of [V]')")
    g.add_argument("--clean-prompt", default=TrainConfig.clean_prompt,
                   help="clean target prompt y_c (default: derived from --prompt)")
    _add_flags(p, TrainConfig, sections)
    sections[CHECKPOINTS].add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    sections[CHECKPOINTS].add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def _train_settings(args) -> dict:
    """The TrainConfig fields the train flags set (each flag's dest is its field's name)."""
    from palp.core.settings import TrainConfig

    return {**settings(args, TrainConfig), "max_grad_norm": args.max_grad_norm or None}  # 0 turns clipping off


def config_from_args(args):
    from palp.core.prompts import PromptError, parse_keyed
    from palp.core.settings import ConfigError, Subject, TrainConfig

    if args.prepared:
        from palp.steps.prepare import task_config

        given = [f for f, v in (("--images", args.images), ("--class-word", args.class_word), ("--prompt", args.prompt),
                                ("--personalization-prompt", args.personalization_prompt),
                                ("--clean-prompt", args.clean_prompt)) if v]
        if given:
            raise ConfigError(f"--prepared already gives subjects and prompts; drop {', '.join(given)}")
        return task_config(args.prepared, args.task, **_train_settings(args))
    if args.task:
        raise ConfigError("--task needs --prepared")
    missing = [f for f, v in (("--images", args.images), ("--class-word", args.class_word), ("--prompt", args.prompt)) if not v]
    if missing:
        raise ConfigError(f"give {', '.join(missing)} (or a --prepared dataset)")
    try:
        images = parse_keyed(args.images, flag="--images")
        words = parse_keyed(args.class_word, flag="--class-word")
        y_p = parse_keyed(args.personalization_prompt, flag="--personalization-prompt")
    except PromptError as e:
        raise ConfigError(str(e)) from e
    for flag, keyed in (("--class-word", words), ("--personalization-prompt", y_p)):
        extra = sorted(set(keyed) - set(images))
        if extra:
            raise ConfigError(f"{flag} names {', '.join(extra)}, which has no --images")
    missing = sorted(set(images) - set(words))
    if missing:
        raise ConfigError(f"{', '.join(missing)} has images but no class word; pass --class-word {missing[0]}=WORD")
    subjects = [Subject(ph, folder, words[ph], y_p.get(ph, "")) for ph, folder in images.items()]
    return TrainConfig(subjects=subjects, target_prompt=args.prompt, clean_prompt=args.clean_prompt, **_train_settings(args))


def run_train(args) -> int:
    from palp.steps.train import train

    cfg = config_from_args(args)
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # one line per run, from its first process
        return 0
    last = result.metrics[-1] if result.metrics else {}
    prior = f"  prior_loss {last['prior_loss']:.4f}" if "prior_loss" in last else ""
    from palp.core.settings import method_label

    print(f"trained {cfg.steps} steps ({method_label(cfg.method, cfg.noise, cfg.personalize)}) -> {result.output}  "
          f"rec_loss {last.get('rec_loss', float('nan')):.4f}  align_loss {last.get('align_loss', float('nan')):.4f}{prior}")
    return 0


def _named(values, flag: str) -> dict[str, str]:
    from palp.steps.prepare import PrepareError

    out = {}
    for raw in values or ():
        name, sep, value = raw.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise PrepareError(f"{flag} wants NAME=VALUE, got {raw!r}")
        if name.strip() in out:
            raise PrepareError(f"{flag} is given twice for {name.strip()}")
        out[name.strip()] = value.strip()
    return out


def add_prepare_parser(sub) -> None:
    from palp.core.settings import DEFAULT_BASE_MODEL, ScoreSettings

    p = sub.add_parser("prepare", help="validate and prepare subject photos and target prompts",
                       formatter_class=_HelpFormatter)
    p.add_argument("--subject", action="append", required=True, metavar="NAME=DIR_OR_GS_URI", help="a subject's photos")
    p.add_argument("--prompt", action="append", metavar="PROMPT", help="a target prompt with [V] (repeatable)")
    p.add_argument("--prompts-file", help="YAML prompts file (e.g. evaluation/prompts/paper.yaml)")
    p.add_argument("--clean-prompt", help="clean prompt for the single --prompt (default: derived)")
    p.add_argument("--class-word", action="append", metavar="NAME=WORD", help="class word (default: CLIP zero-shot)")
    p.add_argument("--placeholder", action="append", metavar="NAME=[V1]", help="placeholder of a subject (default [V])")
    p.add_argument("--personalization-prompt", action="append", metavar="NAME=PROMPT",
                   help="personalization prompt of a subject (default 'A photo of [V]')")
    p.add_argument("--truth", action="append", metavar="NAME=JSON_FILE",
                   help="a subject's known ground truth (a toy-world subject file, examples/toyworld/NAME.json), "
                        "recorded in the manifest: palp score --judge measures identity against it")
    p.add_argument("--output", required=True, help="folder or gs:// prefix for the prepared dataset")
    p.add_argument("--pretrained-model", default=DEFAULT_BASE_MODEL, help="its resolution is used")
    p.add_argument("--resolution", type=int, help="image side (default: the model's)")
    p.add_argument("--min-image-size", type=int, help="smallest accepted side (default: half the resolution)")
    p.add_argument("--near-duplicate-distance", type=int, default=4, help="max dHash distance of a near duplicate")
    p.add_argument("--clip", default=ScoreSettings.clip_model, help="open_clip model for class words (or 'tiny', 'toyworld')")
    p.add_argument("--clip-weights", default=ScoreSettings.clip_weights, help="open_clip pretrained tag or checkpoint path")
    p.add_argument("--class-vocabulary", help="vocabulary YAML (default evaluation/classes/vocabulary.yaml)")
    p.add_argument("--min-confidence", type=finite_float, default=0.3, help="flag a zero-shot winner below this")
    p.add_argument("--pin-clip", action="store_true",
                   help="record the --clip weights' pin even when no class word is derived (score checks it)")
    p.add_argument("--inputs-fingerprint", default="",
                   help="recorded in the manifest (a pipeline's digest of its inputs: its cache key follows the data)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_prepare)


def run_prepare(args) -> int:
    from palp.steps.prepare import PrepareError, PromptSpec, SubjectSpec, load_prompts_file, prepare, summary_table

    sources = _named(args.subject, "--subject")
    words, phs = _named(args.class_word, "--class-word"), _named(args.placeholder, "--placeholder")
    y_p = _named(args.personalization_prompt, "--personalization-prompt")
    from palp.toyworld.truth import read_truth_file

    truths = _named(args.truth, "--truth")
    for flag, keyed in (("--class-word", words), ("--placeholder", phs), ("--personalization-prompt", y_p), ("--truth", truths)):
        if set(keyed) - set(sources):
            raise PrepareError(f"{flag} names {sorted(set(keyed) - set(sources))[0]!r}, which is not a --subject")
    subjects = [SubjectSpec(n, src, words.get(n), phs.get(n, "[V]"), y_p.get(n, ""), read_truth_file(truths[n]) if n in truths else None)
                for n, src in sources.items()]
    prompts = [PromptSpec(p) for p in args.prompt or []]
    if args.clean_prompt:
        if len(prompts) != 1:
            raise PrepareError("--clean-prompt goes with exactly one --prompt; put clean prompts in a --prompts-file")
        prompts[0].clean_prompt = args.clean_prompt
    if args.prompts_file:
        prompts += load_prompts_file(args.prompts_file)
    manifest = prepare(subjects, prompts, args.output, pretrained_model=args.pretrained_model, resolution=args.resolution,
                       min_size=args.min_image_size, near_duplicate=args.near_duplicate_distance, clip_model=args.clip,
                       clip_weights=args.clip_weights, vocabulary=args.class_vocabulary, min_confidence=args.min_confidence,
                       inputs_fingerprint=args.inputs_fingerprint, pin_clip=args.pin_clip, progress=not args.quiet)
    print(summary_table(manifest))
    print(f"\nprepared {len(manifest['subjects'])} subject(s), {len(manifest['tasks'])} task(s) -> {args.output}")
    return 0


def add_sample_parser(sub) -> None:
    from palp.core.settings import ATTENTION_BACKENDS, COMPILE_CHOICES, SampleSettings
    from palp.models.denoising import SCHEDULERS
    from palp.steps.sample import SAMPLERS

    p = sub.add_parser("sample", help="sample a trained run (or its base model) in batches",
                       formatter_class=_HelpFormatter)
    p.add_argument("--model", required=True, help="a finished `palp train` output (folder or gs://)")
    p.add_argument("--output", required=True, help="samples folder or gs:// prefix (several runs may share it)")
    p.add_argument("--prompts", nargs="+", help="prompts with placeholders (default: the run's target prompt)")
    p.add_argument("--task", action="append", metavar="TASK",
                   help="sample this task's target prompt (repeatable; needs --prepared): a TI+DB run serves every "
                        "task of its subjects")
    p.add_argument("--prepared", help="the prepared dataset holding the --task ids")
    _add_flags(p, SampleSettings, scheduler=SCHEDULERS)
    p.add_argument("--reference", action="store_true", help="sample the base model on the clean prompt (Fig. 6's reference)")
    p.add_argument("--precision", choices=("auto", "fp64", "fp32", "fp16", "bf16"), default="auto",
                   help="auto: fp16 on GPU, fp32 on CPU; fp64 makes images bit-identical across batch sizes")
    p.add_argument("--device", help="default: cuda if available")
    p.add_argument("--sampler", choices=SAMPLERS, default="palp",
                   help="palp: the stock pipeline's steps without per-step host syncs; stock: the pipeline itself")
    p.add_argument("--vae-precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="the VAE decoder's precision (auto: as --precision)")
    p.add_argument("--compile", choices=("auto", *COMPILE_CHOICES), default="auto",
                   help="torch.compile the UNet's repeated blocks or all of it; auto: blocks on CUDA, none elsewhere")
    p.add_argument("--compile-cache", default="", metavar="DIR", help="folder or gs:// prefix keeping the compiled kernels")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto", help="the SDPA kernel (auto: PyTorch's choice)")
    p.add_argument("--neti-truncation", type=int, default=None, metavar="K",
                   help="NeTI runs: keep only the mapper's first K hidden units (NeTI's inference-time truncation: "
                        "smaller K, a coarser and more editable token; default: all of them)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_sample)


def run_sample(args) -> int:
    from palp.core.settings import SampleSettings
    from palp.steps.sample import sample

    rows = sample(args.model, args.output, prompts=args.prompts, tasks=args.task, prepared=args.prepared,
                  **settings(args, SampleSettings), reference=args.reference, precision=args.precision,
                  device=args.device, progress=not args.quiet, sampler=args.sampler, vae_precision=args.vae_precision,
                  compile=args.compile, compile_cache=args.compile_cache, attention=args.attention,
                  neti_truncation=args.neti_truncation)
    print(f"{len(rows)} samples -> {args.output}")
    return 0


def add_score_parser(sub) -> None:
    from palp.core.settings import ScoreSettings

    p = sub.add_parser("score", help="CLIP text and image alignment: Table 2, Fig. 6, an HTML report",
                       formatter_class=_HelpFormatter)
    p.add_argument("--samples", action="append", required=True, help="a `palp sample` output (repeatable)")
    p.add_argument("--prepared", required=True, help="the prepared dataset the runs were trained on")
    p.add_argument("--output", required=True)
    _add_flags(p, ScoreSettings)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_score)


def run_score(args) -> int:
    from palp.core.settings import ScoreSettings
    from palp.steps.score import score

    scores = score(args.samples, args.prepared, args.output, **settings(args, ScoreSettings), progress=not args.quiet)
    print(storage_text(args.output, "table2.md"))
    print(f"{len(scores)} images scored -> {args.output}")
    return 0


def storage_text(folder: str, name: str) -> str:
    from palp.core import storage

    return storage.read_text(storage.join(folder, name))


def add_study_parser(sub) -> None:
    from palp.core.settings import StudySettings

    study = sub.add_parser("study", help="user-study forms (export) and their analysis (Table 3)")
    ssub = study.add_subparsers(dest="study_command", required=True)
    e = ssub.add_parser("export", help="blinded forms from the samples of several methods",
                        formatter_class=_HelpFormatter)
    e.add_argument("--samples", action="append", required=True, help="a `palp sample` output (repeatable)")
    e.add_argument("--prepared", required=True, help="the prepared dataset (input images, elements)")
    e.add_argument("--output", required=True, help="folder or gs:// prefix: forms/ and key/")
    _add_flags(e, StudySettings)
    e.add_argument("--links", choices=("embedded", "signed"), default="embedded",
                   help="signed: gs:// output, V4 signed image URLs in the CSV forms")
    e.add_argument("--expiry-hours", type=int, default=168, help="lifetime of signed URLs")
    e.add_argument("--methods", nargs="+", help="only these methods (default: all in the samples)")
    e.add_argument("--salt", default="", help="key/layout.json's salt of an earlier export: with its --seed, the same "
                                               "layout again (default: a fresh secret salt, kept in key/)")
    e.set_defaults(func=run_study_export)
    a = ssub.add_parser("analyze", help="Table 3 from filled forms", formatter_class=_HelpFormatter)
    a.add_argument("--responses", required=True, help="a filled form, a folder of them, or a glob (XLSX or CSV)")
    a.add_argument("--key", required=True, help="key/answer_key.csv of the export")
    a.add_argument("--output", required=True)
    a.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(func=run_study_analyze)


def run_study_export(args) -> int:
    from palp.core.settings import StudySettings
    from palp.steps.study import export

    summary = export(args.samples, args.prepared, args.output, **settings(args, StudySettings), links=args.links,
                     expiry_hours=args.expiry_hours, methods=args.methods, salt=args.salt)
    print(f"{summary['questions']} questions ({', '.join(summary['methods'])}) in forms of {summary['forms']} -> {args.output}")
    return 0


def run_study_analyze(args) -> int:
    from palp.steps.analyze import analyze, markdown

    t3 = analyze(args.responses, args.key, args.output, n_boot=args.bootstrap, seed=args.seed)
    print(markdown(t3))
    return 0


def add_image_parser(sub) -> None:
    img = sub.add_parser("image", help="build the step image")
    isub = img.add_subparsers(dest="image_command", required=True)
    b = isub.add_parser("build", help="docker build of images/Dockerfile", formatter_class=_HelpFormatter)
    b.add_argument("--target", choices=("cpu", "gpu", "tpu"), default="cpu")
    b.add_argument("--base-image", help="default: the target's public base (python:3.11-slim-bookworm)")
    b.add_argument("--tag", help="default: palp-<target>:<palp version>")
    b.add_argument("--index-url", help="pip index for the build (e.g. a mirror)")
    b.add_argument("--extra-index-url", action="append", help="extra pip index, e.g. a wheelhouse on http://127.0.0.1:PORT/simple")
    b.add_argument("--find-links", action="append", help="a wheelhouse (flat folder served over http), e.g. http://127.0.0.1:PORT/")
    b.add_argument("--trusted-host", action="append", help="pip trusted host (a plain-http wheelhouse)")
    b.add_argument("--ca-bundle", help="CA bundle pip uses inside the build (a TLS-intercepting proxy)")
    b.add_argument("--keep-old", action="store_true", help="keep untagged earlier palp images (they are pruned by default)")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=run_image_build)


def run_image_build(args) -> int:
    from palp.step_image import build

    tag = build(args.target, tag=args.tag, base_image=args.base_image, index_url=args.index_url,
                extra_index_urls=args.extra_index_url, trusted_hosts=args.trusted_host, find_links=args.find_links,
                ca_bundle=args.ca_bundle, quiet=args.quiet, prune=not args.keep_old)
    print(tag)
    return 0


def build_parser(commands=()) -> argparse.ArgumentParser:
    """The library's commands, plus ``commands`` (functions that each add one to the
    subparsers: the layers above the library add theirs, e.g. ``palp pipeline``)."""
    parser = argparse.ArgumentParser(prog="palp", description="Prompt Aligned Personalization of text-to-image models")
    parser.add_argument("--version", action="version", version=f"palp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_prepare_parser(sub)
    add_train_parser(sub)
    add_sample_parser(sub)
    add_score_parser(sub)
    add_study_parser(sub)
    for add in commands:
        add(sub)
    add_image_parser(sub)
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    from palp.core.gcs import StorageError
    from palp.core.locks import LockError
    from palp.core.prompts import PromptError
    from palp.core.settings import ConfigError
    from palp.core.subject_images import SubjectImageError
    from palp.models.base_model import ModelError
    from palp.models.clip import ClipError
    from palp.step_image import ImageError
    from palp.steps.prepare import PrepareError
    from palp.steps.sample_jobs import SampleError
    from palp.steps.score import ScoreError
    from palp.steps.study import StudyError
    from palp.steps.train import TrainingError
    from palp.toyworld.truth import TruthFileError

    return (ConfigError, SubjectImageError, ModelError, PromptError, StorageError, TrainingError, PrepareError, ClipError,
            SampleError, ScoreError, StudyError, ImageError, LockError, TruthFileError)


def main(argv: list[str] | None = None, *, raise_errors: bool = False, commands=(), errors: tuple = ()) -> int:
    """Run one ``palp`` command. Bad input prints one error line and returns 2, or, with
    ``raise_errors`` (pipeline components), raises it so the step fails with that message.

    ``commands`` and ``errors``: more commands and their user-error types, from the layers
    above the library (the installed ``palp`` is ``pipelines.cli.main``, which adds
    ``palp pipeline``); the library itself never imports them."""
    args = build_parser(commands).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if raise_errors:
        return args.func(args)
    from palp.core.preemption import Preempted

    try:
        return args.func(args)
    except Preempted as e:  # SIGTERM/SIGINT honoured: what was kept, and 128 + the signal (retryable)
        print(f"{e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        from palp.core import storage

        if storage.is_disk_full(e) and not isinstance(e, storage.DiskFullError):  # a write no step wrapped
            e = storage.disk_full_error(e, getattr(args, "output", None) or ".",
                                        kept="what was written before is kept, and a rerun continues from it")
        elif not isinstance(e, user_errors() + tuple(errors)):
            raise
        command = " ".join(filter(None, [args.command, getattr(args, "study_command", None), getattr(args, "pipeline_command", None),
                                          getattr(args, "image_command", None)]))
        print(f"palp {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
