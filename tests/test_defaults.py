"""Every setting's default is defined once (palp.core.settings) and the CLI, the library functions
and the pipeline agree with it; the pipeline's deliberate differences are named with a reason."""

from __future__ import annotations

import dataclasses
import inspect

from palp.cli import build_parser
from palp.core import settings as config


def _default(cls, name):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _cli(*argv):
    return vars(build_parser().parse_args(list(argv)))


def test_the_cli_takes_its_defaults_from_the_configs():
    train = _cli("train", "--output", "x")
    fields = [f.name for f in dataclasses.fields(config.TrainConfig) if f.name in train
              and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)]
    assert len(fields) > 30  # nearly every setting is a flag
    assert {n: train[n] for n in fields} == {n: _default(config.TrainConfig, n) for n in fields}
    for argv, cls in (
        (("sample", "--model", "m", "--output", "o"), config.SampleSettings),
        (("score", "--samples", "s", "--prepared", "p", "--output", "o"), config.ScoreSettings),
        (("study", "export", "--samples", "s", "--prepared", "p", "--output", "o"), config.StudySettings),
    ):
        parsed = _cli(*argv)
        for f in dataclasses.fields(cls):
            assert parsed[f.name] == f.default, (argv[0], f.name)
    prep = _cli("prepare", "--subject", "a=b", "--output", "o")
    assert prep["pretrained_model"] == config.DEFAULT_BASE_MODEL == _default(config.TrainConfig, "pretrained_model")
    assert (prep["clip"], prep["clip_weights"]) == (config.ScoreSettings.clip_model, config.ScoreSettings.clip_weights)


def test_the_train_flags_are_the_configs_fields():
    """Every TrainConfig setting is a flag made from its field (palp.core.flags), the task's fields
    (subjects and prompts, which the CLI assembles) excepted; and the other way round."""
    from palp.core.flags import flag_fields

    task = {"subjects", "target_prompt", "clean_prompt", "task_id", "elements"}
    flagged = {f.name for f in flag_fields(config.TrainConfig)}
    assert flagged == {f.name for f in dataclasses.fields(config.TrainConfig)} - task
    parser = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    by_dest = {a.dest: a for a in parser._actions}
    cli_only = {"help", "prepared", "task", "images", "class_word", "prompt", "personalization_prompt", "clean_prompt",
                "resume", "quiet"}
    assert set(by_dest) == flagged | cli_only
    assert by_dest["lam"].option_strings == ["--lambda"] and by_dest["output"].required
    assert by_dest["save_steps"].default == list(config.DEFAULT_SAVE_STEPS)


def test_the_library_functions_take_their_defaults_from_the_configs():
    from palp.steps.prepare import prepare
    from palp.steps.sample import sample
    from palp.steps.score import score
    from palp.steps.study import export

    for fn, cls in ((sample, config.SampleSettings), (score, config.ScoreSettings), (export, config.StudySettings)):
        params = inspect.signature(fn).parameters
        for f in dataclasses.fields(cls):
            assert params[f.name].default == f.default, (fn.__name__, f.name)
    params = inspect.signature(prepare).parameters
    assert params["pretrained_model"].default == config.DEFAULT_BASE_MODEL
    assert params["clip_model"].default == config.ScoreSettings.clip_model


def test_the_pipeline_takes_the_library_defaults_but_the_named_ones():
    from palp.steps.launch import DEFAULT_PROCESSES
    from pipelines.palp_pipeline import DIFFERENT_DEFAULTS, build_pipeline

    T, Sa, Sc, St = config.TrainConfig, config.SampleSettings, config.ScoreSettings, config.StudySettings
    library = {
        "pretrained_model": _default(T, "pretrained_model"), "train_steps": _default(T, "steps"),
        "batch_size": _default(T, "batch_size"), "micro_batch_size": _default(T, "micro_batch_size"),
        "lr": _default(T, "lr"), "lam": _default(T, "lam"), "alpha": _default(T, "alpha"), "beta": _default(T, "beta"), "lora_rank": _default(T, "lora_rank"), "lora_targets": _default(T, "lora_targets"),
        "save_steps": ",".join(map(str, _default(T, "save_steps"))), "checkpoint_every": _default(T, "checkpoint_every"),
        "validation_every": _default(T, "validation_every"), "prior_preservation": _default(T, "prior_preservation"),
        "prior_weight": _default(T, "prior_weight"), "num_class_images": _default(T, "num_class_images"),
        "mixed_precision": _default(T, "mixed_precision"), "seed": _default(T, "seed"),
        "train_accelerators": DEFAULT_PROCESSES,
        "clip_model": Sc.clip_model, "clip_weights": Sc.clip_weights, "judge": Sc.judge,
        "num_samples": Sa.num_samples, "sample_steps": Sa.steps, "sample_batch_size": Sa.batch_size,
        "scheduler": Sa.scheduler, "guidance": Sa.guidance, "checkpoints": Sa.checkpoints,
        "study_forms": St.forms, "study_seed": St.seed, "study_image_size": St.image_size,
    }
    pipeline = {n: p.default for n, p in inspect.signature(build_pipeline().pipeline_func).parameters.items()}
    assert set(library) <= set(pipeline) and set(DIFFERENT_DEFAULTS) <= set(library)
    for name, value in library.items():
        if name in DIFFERENT_DEFAULTS:
            named, reason = DIFFERENT_DEFAULTS[name]
            assert pipeline[name] == named != value and len(reason) > 20, name
        else:
            assert pipeline[name] == value, name


def test_the_train_components_own_defaults_are_the_librarys():
    """The component's keyword defaults (for calls that omit them) are the library's; KFP serialises
    the component's source, so it cannot read them from palp."""
    from components.steps import train

    T = config.TrainConfig
    params = inspect.signature(train).parameters
    own = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty and n != "processes"}
    # a KFP parameter cannot be None: 0 (False) stands for it
    zero_for_none = {"prior_weight", "num_class_images", "prior_preservation"}
    assert {n: own[n] for n in zero_for_none} == dict.fromkeys(zero_for_none, 0) and all(_default(T, n) is None for n in zero_for_none)
    same = {n: v for n, v in own.items() if n not in zero_for_none}
    assert same == {n: _default(T, n) for n in same} and {"lam", "alpha", "beta"} <= set(same)


def test_help_shows_each_default_once(capsys):
    """`palp train --help`: a flag whose help states its default is not given "(default: None)"
    after it; a flag with a plain default shows it."""
    import pytest

    from palp.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out
    assert "(default: class; rare for" in out  # --token-init, which states its own
    assert "(default: 100)" in out  # --checkpoint-every
