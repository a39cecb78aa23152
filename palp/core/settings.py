"""Typed training settings, with the paper's defaults (Appendix C) and validation at construction."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from palp.core import storage
from palp.core.elements import elements_of
from palp.core.flags import flag, step_numbers
from palp.core.methods import (DEFAULT_PERSONALIZATION, METHOD_TABLE, METHODS, NFSD_NEGATIVE_PROMPT, PERSONALIZATION_DEFAULTS,
                               PERSONALIZATIONS)
from palp.core.names import check_name
from palp.core.precision import MIXED_PRECISION
from palp.core.prompts import (DEFAULT_PERSONALIZATION_PROMPT, DEFAULT_PLACEHOLDER, PROMPT_TEMPLATES, CheckedPrompt, PromptError,
                               check_token_length, placeholders_in, token_count, token_init_words)
from palp.core.tracking import REPORT_TO, TrackingError, resolve_report_to

# What --compile may name: nothing, the UNet's repeated blocks (regional), or the whole UNet.
COMPILE_CHOICES = ("none", "transformers", "blocks", "unet")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Which layers get LoRA (--lora-targets). "attention" is the paper's: the self- and
# cross-attention projections. "attention+resnets" adds the two 3x3 convolutions of every
# ResNet block, for UNets with levels that have no attention: SD-1.x has attention at every
# level but the lowest-resolution one, the toy world's UNet has none at its 16x16 level, where
# the fine patterns are drawn.
LORA_TARGET_SETS = {
    "attention": LORA_TARGETS,
    "attention+resnets": (*LORA_TARGETS, "conv1", "conv2"),
}


class ConfigError(ValueError):
    """A setting palp cannot run with; the message names the flag."""


def need(condition: bool, message: str) -> None:
    """ConfigError(message) unless ``condition``."""
    if not condition:
        raise ConfigError(message)


# Method variants an experiment can list: "palp-iid" is PALP with i.i.d. re-noising (--noise iid);
# "palp+custom-diffusion" is PALP's alignment over Custom Diffusion (--personalize custom-diffusion);
# "custom-diffusion" is Custom Diffusion alone.
NOISE_SUFFIX = "-iid"
PERSONALIZE_JOIN = "+"


def method_default(method: str, personalize: str | None, name: str, palp_default):
    """A training setting's default for ``method`` over ``personalize`` (None: the method's own
    personalization, else palp's): the method's own, else its personalization's, else ``palp_default``."""
    row = METHOD_TABLE.get(method)
    personalize = personalize or (row.personalize if row else None) or DEFAULT_PERSONALIZATION
    own = (row.defaults if row else {}).get(name) or PERSONALIZATION_DEFAULTS.get(personalize, {}).get(name)
    return palp_default if own is None else own.value


def split_variant(variant: str) -> tuple[str, str, str]:
    """``palp`` -> (palp, same, lora-token); ``palp-iid`` -> (palp, iid, lora-token);
    ``palp+custom-diffusion`` -> (palp, same, custom-diffusion); ``custom-diffusion`` ->
    (custom-diffusion, same, custom-diffusion); checked against the methods."""
    head, _, personalize = variant.partition(PERSONALIZE_JOIN)
    base, noise = (head[: -len(NOISE_SUFFIX)], "iid") if head.endswith(NOISE_SUFFIX) else (head, "same")
    method = METHOD_TABLE.get(base)
    implied = method.personalize if method else None
    ok = (method is not None and not (noise == "iid" and not method.aligns)
          and (not personalize or (personalize in PERSONALIZATIONS and personalize != DEFAULT_PERSONALIZATION
                                   and implied is None and method.aligns)))
    if not ok:
        plain = [m for m in METHODS if METHOD_TABLE[m].personalize is None]
        options = [*METHODS, *(m + NOISE_SUFFIX for m in plain if METHOD_TABLE[m].aligns),
                   *(m + PERSONALIZE_JOIN + p for p in PERSONALIZATIONS if p != DEFAULT_PERSONALIZATION
                     for m in plain if METHOD_TABLE[m].aligns)]
        raise ConfigError(f"unknown method {variant!r}; choose one of {', '.join(options)}")
    return base, noise, personalize or implied or DEFAULT_PERSONALIZATION


def split_method(variant: str) -> tuple[str, str]:
    """``palp`` -> (palp, same); ``palp-iid`` -> (palp, iid); the method and noise of ``split_variant``."""
    return split_variant(variant)[:2]


# Methods whose training never reads the target prompt (TI+DB: Eq. 1 alone): one run per
# subject serves every prompt of that subject (tests/test_per_subject.py checks the weights match).
PROMPT_FREE_METHODS = tuple(m.name for m in METHOD_TABLE.values() if not m.reads_target_prompt)


def trains_per_subject(variant: str) -> bool:
    """Whether a method variant's training is the same for every target prompt of a subject."""
    return split_method(variant)[0] in PROMPT_FREE_METHODS


def parse_steps(text: str) -> list[int]:
    """``"100,200,300"`` -> [100, 200, 300] (the snapshot steps as a flag or pipeline parameter gives them)."""
    try:
        return step_numbers(text)
    except ValueError:
        raise ConfigError(f"save steps {text!r}: use comma-separated step numbers, e.g. 100,200,300") from None


def method_label(method: str, noise: str = "same", personalize: str = DEFAULT_PERSONALIZATION) -> str:
    """The name a run's samples and scores carry: the method, with -iid for i.i.d. noise and
    +<personalization> for one other than the method's own (the variant ``split_variant`` reads).
    It becomes a folder name (read from a run's config, which may have been edited): checked."""
    aligns = method in METHOD_TABLE and METHOD_TABLE[method].aligns
    label = method + NOISE_SUFFIX if noise == "iid" and aligns else method
    implied = METHOD_TABLE[method].personalize if method in METHOD_TABLE else None
    if personalize and personalize != DEFAULT_PERSONALIZATION and personalize != implied:
        label += PERSONALIZE_JOIN + personalize
    return check_name(label, "method", ConfigError, joined=True)


@dataclass
class Subject:
    placeholder: str  # "[V]", "[V1]", ...
    images: str  # folder (the data-prep step adds gs:// and prepared sets)
    class_word: str
    personalization_prompt: str = ""  # default: "A photo of [V]" with this placeholder
    name: str = ""  # the subject's id in reports (default: the image folder's name)

    def __post_init__(self):
        if self.name:
            check_name(self.name, "subject name", ConfigError)
        else:  # the image folder's name, made safe as a folder name (the subject's samples go under it)
            folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(self.images).rstrip("/")).name)
            self.name = folder if folder.strip(".") else self.placeholder.strip("[]")  # never "", "." or ".."
        if not self.personalization_prompt:
            self.personalization_prompt = DEFAULT_PERSONALIZATION_PROMPT.replace(DEFAULT_PLACEHOLDER, self.placeholder)


DEFAULT_BASE_MODEL = "CompVis/stable-diffusion-v1-4"  # SD v1.4, the paper's base model
DEFAULT_SAVE_STEPS = (100, 200, 300, 400, 500)  # snapshots for Fig. 6's curves


@dataclass(frozen=True)
class SampleSettings:
    """``palp sample``'s defaults (the CLI, ``sample()`` and the pipeline take them from here)."""

    num_samples: int = flag(8)
    seed: int = flag(0)
    steps: int = flag(50, help="denoising steps")
    scheduler: str = flag("ddim")  # its choices: palp.models.denoising.SCHEDULERS
    guidance: float = flag(7.5)
    batch_size: int = flag(8, help="the most images per batch; a batch that runs out of device memory is made in halves "
                                    "and the size that fits is kept for the rest (each image within one 8-bit level of any batch size's)")
    checkpoints: str = flag("final", choices=("all", "final"), help="all: every saved snapshot too")


@dataclass(frozen=True)
class ScoreSettings:
    """``palp score``'s defaults: the paper's evaluation CLIP (open_clip ViT-B-32, OpenAI weights)."""

    clip_model: str = flag("ViT-B-32", name="--clip", metavar="CLIP", help="open_clip model (or 'tiny', 'toyworld')")
    clip_weights: str = flag("openai", help="open_clip pretrained tag or checkpoint path")
    judge: str = flag("", help="also judge toy-world images: 'toyworld' or a judge.safetensors")
    batch_size: int = flag(64)


@dataclass(frozen=True)
class StudySettings:
    """``palp study export``'s defaults."""

    forms: int = flag(3)
    seed: int = flag(0)
    image_size: int = flag(512)


# palp's defaults of the settings whose default depends on the method or the personalization
# (palp.core.methods: Method.defaults, PERSONALIZATION_DEFAULTS); resolved in TrainConfig.
DEFAULT_STEPS = 500
DEFAULT_LR = 5e-5
DEFAULT_BATCH_SIZE = 32
DEFAULT_LORA_RANK = 32
# NeTI's mapper as its code has it (NeuralTextualInversion/NeTI, models/neti_mapper.py).
NETI_HIDDEN = 128
NETI_FEATURES = 1024
NETI_NESTED_DROPOUT = 0.5


# DreamBooth's prior preservation, with diffusers' DreamBooth trainers' defaults
# (--prior_loss_weight 1.0, --num_class_images 100); the class images are sampled as
# `palp sample` samples (its default steps and guidance, DDIM) from this seed.
PRIOR_WEIGHT = 1.0
NUM_CLASS_IMAGES = 100
CLASS_IMAGE_STEPS = SampleSettings.steps
CLASS_IMAGE_GUIDANCE = SampleSettings.guidance
CLASS_IMAGE_SEED = 0


# The sections of `palp train --help`, in order; each flag's field names its own.
SUBJECT, METHOD, OPTIMISATION, SPEED, CHECKPOINTS, WATCHING = TRAIN_SECTIONS = (
    "subject and prompts (or --prepared)", "method (docs/method.md)", "optimisation",
    "speed and memory (none changes what a step computes)", "checkpoints",
    "validation samples and tracking (neither changes what a step computes)")


@dataclass(kw_only=True)
class TrainConfig:
    """One training's settings. The fields made with ``flag`` are ``palp train``'s flags, in
    ``--help`` order (palp.core.flags); the others are the task, which the CLI assembles itself."""

    subjects: list[Subject]
    target_prompt: str
    clean_prompt: str = ""  # default: derived from the target prompt and the class words
    task_id: str = ""  # the prepared dataset's task this run trains, if any
    elements: list[dict] | None = None  # the target prompt's elements (default: palp's rule)
    pretrained_model: str = flag(DEFAULT_BASE_MODEL, section=SUBJECT,
                                 help="Hugging Face id, local diffusers folder, gs:// prefix, 'tiny', 'tiny-sd2', "
                                      "'tiny-sd2-v', 'tiny-sdxl' or 'toyworld'")
    output: str = flag(section=SUBJECT, help="run folder")
    min_image_size: int | None = flag(None, section=SUBJECT,
                                      help="smallest accepted image side (default: half the model resolution)")
    method: str = flag("palp", section=METHOD, choices=METHODS,
                       help="palp: Eq. 1 + the prompt-aligned score (Eq. 6/7); sds, nfsd: other scores; ti-db: Eq. 1 alone; "
                            "custom-diffusion: Custom Diffusion alone (Eq. 1 with its prior preservation); "
                            "p-plus, neti: P+ or NeTI alone (Eq. 1)")
    personalize: str | None = flag(None, section=METHOD, choices=PERSONALIZATIONS,
                                   help=f"what is trained: lora-token (LoRA + [V], the paper's), custom-diffusion "
                                        f"(cross-attention keys/values + [V]), p-plus (a [V] per cross-attention "
                                        f"layer) or neti (a mapper from timestep and layer to [V]); default: the "
                                        f"method's own ({DEFAULT_PERSONALIZATION} but for --method custom-diffusion, "
                                        f"p-plus, neti)")
    noise: str = flag("same", section=METHOD, choices=("same", "iid"), help="eps' of the re-noised estimate")  # docs/method.md, step 3
    align_timestep: str = flag("resample", section=METHOD, choices=("resample", "same"),
                               help="t' of the alignment term: drawn from [--align-t-min, --align-t-max] or = t")
    rescale: bool = flag(True, section=METHOD,
                          help="multiply the alignment term by sqrt(a_t)/sqrt(1-a_t) (docs/method.md, step 5)")
    alpha: float = flag(15.0, section=METHOD, help="CFG scale, pretrained clean branch")
    beta: float = flag(7.5, section=METHOD, help="CFG scale, personalized branch")
    lam: float = flag(1.0, section=METHOD, name="--lambda", help="weight of the alignment term")
    align_fraction: float = flag(1.0, section=METHOD,
                                 help="share of each batch's rows that get the alignment term, drawn uniformly each step, "
                                      "their term scaled by 1/share (unbiased, fewer guidance forwards; 1: every row, the paper's)")
    align_t_min: int = flag(20, section=METHOD, help="smallest t' of the alignment term")
    align_t_max: int = flag(980, section=METHOD, help="largest t' of the alignment term")
    negative_prompt: str = flag(NFSD_NEGATIVE_PROMPT, section=METHOD, help="NFSD's negative prompt")
    # DreamBooth's prior preservation (palp/steps/class_images.py): its three settings are None
    # without it, and take diffusers' DreamBooth defaults with it (resolved in __post_init__).
    prior_preservation: bool | None = flag(None, section=METHOD, bare=True,
                                           help="add DreamBooth's prior-preservation loss: Eq. 1 on images the base model "
                                                "makes of 'A photo of a <class word>', times --prior-weight (default: "
                                                "off; on for --method custom-diffusion)")
    prior_weight: float | None = flag(None, section=METHOD,
                                      help=f"weight of the prior-preservation loss (with --prior-preservation: "
                                           f"{PRIOR_WEIGHT}, diffusers' DreamBooth default)")
    num_class_images: int | None = flag(None, section=METHOD,
                                        help=f"class images per class word (with --prior-preservation: "
                                             f"{NUM_CLASS_IMAGES}, diffusers' DreamBooth default; 200 for "
                                             f"--method custom-diffusion)")
    class_image_steps: int | None = flag(None, section=METHOD,
                                         help=f"DDIM steps of each class image (with --prior-preservation: "
                                              f"{CLASS_IMAGE_STEPS}, as palp sample)")
    # Custom Diffusion's scale augmentation (palp.method.augment): None resolves to the
    # personalization's default (on for custom-diffusion, off otherwise).
    scale_augmentation: bool | None = flag(None, section=METHOD, bare=True,
                                           help="Custom Diffusion's augmentation: each row's photo rescaled to a random size "
                                                "(1/3 to 1x, or 1.2 to 1.4x cropped), its prompt told so ('very small', "
                                                "'close up'...) and the loss masked to the photo (default: on for "
                                                "--personalize custom-diffusion, off otherwise)")
    hflip: float | None = flag(None, section=METHOD, metavar="P",
                               help="the chance that a training row takes its photo mirrored left-right (default: 0; "
                                    "0.5 for --personalize neti, as NeTI trains)")
    prompt_templates: str | None = flag(None, section=METHOD, choices=("none", *PROMPT_TEMPLATES),
                                        help="each training row's prompt: none: the subject's personalization prompt; "
                                             "textual-inversion: one of Textual Inversion's 27 object templates ('a photo of "
                                             "the small [V]'...), drawn per row (default: none; textual-inversion for "
                                             "--personalize neti, as NeTI trains)")
    token_init: str | None = flag(None, section=METHOD, metavar="WORD",
                                  help="the word each placeholder token's embedding starts from: class (its subject's class "
                                       "word), rare (Custom Diffusion's rarely used tokens ktn, pll, ucd, one per subject in "
                                       "turn) or any word, for every subject (default: class; rare for --personalize "
                                       "custom-diffusion, as Custom Diffusion trains)")
    steps: int | None = flag(None, section=OPTIMISATION,
                             help=f"optimizer steps (default: {DEFAULT_STEPS}; 250 for --method custom-diffusion)")
    lr: float | None = flag(None, section=OPTIMISATION,
                            help=f"AdamW learning rate (default: {DEFAULT_LR:g}; 1e-05 for --personalize custom-diffusion)")
    batch_size: int | None = flag(None, section=OPTIMISATION,  # micro_batch_size x accumulation x processes
                                  help=f"global batch (default: {DEFAULT_BATCH_SIZE}; 2 for --method custom-diffusion)")
    micro_batch_size: int | None = flag(None, section=OPTIMISATION, auto=True,
                                        help="per-process batch per forward; auto (the default): the largest divisor "
                                             "of the per-process batch whose step fits the device's free memory, found "
                                             "by a probe before the first step, recorded and kept on --resume; the "
                                             "global batch is kept by accumulation")
    lora_rank: int | None = flag(None, section=OPTIMISATION,
                                 help=f"LoRA rank (default: {DEFAULT_LORA_RANK}; lora-token only)")
    lora_alpha: float | None = flag(None, section=OPTIMISATION, help="default: = rank")
    lora_targets: str = flag("attention", section=OPTIMISATION, choices=LORA_TARGET_SETS,
                             help="attention: the attention projections (the paper's); attention+resnets: also the "
                                  "ResNet blocks' convolutions, for UNets with attention-free levels")
    # NeTI's mapper (palp/models/neti.py); None: NeTI's own values, refused for other personalizations.
    neti_hidden: int | None = flag(None, section=OPTIMISATION,
                                   help=f"units of the NeTI mapper's hidden layers (default: {NETI_HIDDEN}; neti only)")
    neti_features: int | None = flag(None, section=OPTIMISATION,
                                     help=f"Fourier features of the mapper's (timestep, layer) input (default: "
                                          f"{NETI_FEATURES}; neti only)")
    neti_nested_dropout: float | None = flag(None, section=OPTIMISATION,
                                             help=f"probability of the mapper's nested dropout per step (default: "
                                                  f"{NETI_NESTED_DROPOUT}; neti only)")
    neti_bypass: bool | None = flag(None, section=OPTIMISATION,
                                    help="the mapper's output bypass, added to the text encoder's output at [V] for "
                                         "the attention values (default: on; neti only)")
    max_grad_norm: float | None = flag(1.0, section=OPTIMISATION, help="0 turns clipping off")  # the CLI's 0 is None here
    weight_decay: float = flag(1e-2, section=OPTIMISATION, help="AdamW weight decay")
    mixed_precision: str = flag("no", section=OPTIMISATION, choices=MIXED_PRECISION, help="frozen weights and autocast in fp16/bf16; trainable weights stay fp32")
    seed: int = flag(0, section=OPTIMISATION, help="seed of the LoRA initialisation and of every step's draws")
    # Reproducibility: deterministic kernels and reductions, and a fixed CPU thread count (CPU
    # reductions are split by thread; 0: torch's default, resolved and recorded at the start).
    deterministic: bool = flag(True, section=OPTIMISATION,
                               help="deterministic kernels (torch.use_deterministic_algorithms): two runs and a resumed "
                                    "run are bit-identical; off: PyTorch's fastest kernels")
    threads: int = flag(0, section=OPTIMISATION, help="CPU threads (0: torch's default, recorded in "
                                                      "training_config.json; --resume keeps the run's)")
    # Speed and memory (palp/models/speed.py); none of these changes what a step computes.
    fused_guidance: bool = flag(True, section=SPEED, help="the pretrained and personalized guidance branches in one UNet call")
    compile: str = flag("auto", section=SPEED, choices=("auto", *COMPILE_CHOICES),
                        help="torch.compile the UNet's repeated blocks or all of it; auto: blocks on CUDA, none elsewhere")
    compile_mode: str = flag("default", section=SPEED, choices=COMPILE_MODES)  # torch.compile mode
    compile_cache: str = flag("", section=SPEED, metavar="DIR",
                              help="folder or gs:// prefix keeping the compiled kernels, reused by later runs")
    channels_last: bool = flag(False, section=SPEED, help="channels-last memory format for the UNet")
    attention: str = flag("auto", section=SPEED, choices=ATTENTION_BACKENDS, help="the SDPA kernel (auto: PyTorch's choice)")
    gradient_checkpointing: bool = flag(False, section=SPEED, help="less memory for about one more UNet forward per step")
    checkpoint_every: int = flag(100, section=CHECKPOINTS, help="steps between resumable checkpoints")
    checkpoints_total_limit: int = flag(2, section=CHECKPOINTS, help="checkpoints kept (older ones are removed, locally and in the bucket)")
    save_steps: list[int] = flag(factory=lambda: list(DEFAULT_SAVE_STEPS), section=CHECKPOINTS,
                                 help="steps whose LoRA + embeddings are kept as snapshots")
    # Watching a run (palp/steps/validation.py, palp/core/tracking.py): the training's steps are the same with or without.
    validation_every: int = flag(0, section=WATCHING, metavar="N",
                                 help="sample the current LoRA + [V] every N steps (and at the last) into "
                                      "validation/step-N.png (0: never)")
    validation_prompts: list[str] = flag(factory=list, section=WATCHING, name="--validation-prompt", metavar="PROMPT",
                                         help="a prompt to validate with, with the placeholders (repeatable; "
                                              "default: the target prompt)")
    validation_images: int = flag(4, section=WATCHING, help="images per validation prompt (seeds from --validation-seed)")
    validation_seed: int = flag(0, section=WATCHING, help="first seed of the validation samples")
    validation_steps: int = flag(25, section=WATCHING, help="DDIM steps of each validation sample")
    validation_guidance: float = flag(SampleSettings.guidance, section=WATCHING, help="classifier-free guidance scale")
    report_to: str = flag("auto", section=WATCHING, choices=REPORT_TO,
                          help="experiment tracker for the scalars and validation images (auto: tensorboard when "
                               "installed, else none; tensorboard logs go to OUTPUT/logs)")

    def __post_init__(self):
        """The method-dependent defaults resolved, every setting checked (ConfigError naming the
        flag), then the subjects and the prompts."""
        self._resolve_defaults()
        self._check_values()
        self._check_subjects_and_prompts()

    def method_default(self, name: str, palp_default):
        """A setting's default for this run: the method's own, else its personalization's, else palp's."""
        return method_default(self.method, self.personalize, name, palp_default)

    def _resolve_defaults(self) -> None:
        need(self.method in METHODS, f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        implied = METHOD_TABLE[self.method].personalize
        if self.personalize is None:
            self.personalize = implied or DEFAULT_PERSONALIZATION
        need(self.personalize in PERSONALIZATIONS,
             f"--personalize must be one of {', '.join(PERSONALIZATIONS)}, not {self.personalize!r}")
        need(implied is None or self.personalize == implied,
             f"--method {self.method} trains {implied}; drop --personalize {self.personalize}")
        if self.personalize == "lora-token":
            self.lora_rank = DEFAULT_LORA_RANK if self.lora_rank is None else self.lora_rank
        else:
            lora = [f for f, v, d in (("--lora-rank", self.lora_rank, None), ("--lora-alpha", self.lora_alpha, None),
                                      ("--lora-targets", self.lora_targets, "attention")) if v != d]
            need(not lora, f"{' and '.join(lora)} only apply to --personalize lora-token (this run trains "
                           f"{self.personalize}); drop {' and '.join(lora)}")
        self._resolve_neti()
        for name, palp_default in (("steps", DEFAULT_STEPS), ("lr", DEFAULT_LR), ("batch_size", DEFAULT_BATCH_SIZE),
                                   ("prior_preservation", False), ("scale_augmentation", False), ("prompt_templates", "none"),
                                   ("hflip", 0.0), ("token_init", "class")):
            if getattr(self, name) is None:
                setattr(self, name, self.method_default(name, palp_default))
        need(self.token_init.strip() == self.token_init and not placeholders_in(self.token_init)
             and token_count(self.token_init) > 2,  # (start and end: 2)
             f"--token-init must be class, rare or a word to start each token from, not {self.token_init!r}")
        need(0 <= self.hflip <= 1, f"--hflip must be a probability between 0 and 1, not {self.hflip}")
        need(self.prompt_templates in ("none", *PROMPT_TEMPLATES),
             f"--prompt-templates must be one of none, {', '.join(PROMPT_TEMPLATES)}, not {self.prompt_templates!r}")

    def _resolve_neti(self) -> None:
        """NeTI's mapper settings: its defaults for --personalize neti, refused for the others."""
        fields = (("--neti-hidden", "neti_hidden", NETI_HIDDEN), ("--neti-features", "neti_features", NETI_FEATURES),
                  ("--neti-nested-dropout", "neti_nested_dropout", NETI_NESTED_DROPOUT), ("--neti-bypass", "neti_bypass", True))
        if self.personalize != "neti":
            given = [f for f, name, _ in fields if getattr(self, name) is not None]
            need(not given, f"{' and '.join(given)} only apply to --personalize neti (this run trains {self.personalize}); "
                            f"drop {' and '.join(given)}")
            return
        for _, name, default in fields:
            setattr(self, name, default if getattr(self, name) is None else getattr(self, name))
        need(self.neti_hidden >= 1, f"--neti-hidden must be >= 1, not {self.neti_hidden}")
        need(self.neti_features >= 1, f"--neti-features must be >= 1, not {self.neti_features}")
        need(0 <= self.neti_nested_dropout <= 1, f"--neti-nested-dropout must be in [0, 1], not {self.neti_nested_dropout}")

    def neti_options(self) -> dict | None:
        """The NeTI mapper's settings (palp.models.neti.NetiTokens), None for other personalizations."""
        if self.personalize != "neti":
            return None
        return {"hidden": self.neti_hidden, "features": self.neti_features, "bypass": bool(self.neti_bypass)}

    def _check_values(self) -> None:
        need(bool(self.subjects), "at least one subject (--images) is needed")
        need(self.method in METHODS, f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        need(self.noise in ("same", "iid"), f"--noise must be same or iid, not {self.noise!r}")
        need(self.align_timestep in ("resample", "same"), f"--align-timestep must be resample or same, not {self.align_timestep!r}")
        need(self.mixed_precision in MIXED_PRECISION, f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        need(0 <= self.align_t_min <= self.align_t_max <= 999, "alignment t-range must satisfy 0 <= min <= max <= 999")
        need(0 < self.align_fraction <= 1, f"--align-fraction must be in (0, 1], not {self.align_fraction}")
        need(self.lora_rank is None or self.lora_rank >= 1, "--lora-rank must be >= 1")
        need(self.lora_targets in LORA_TARGET_SETS,
             f"--lora-targets must be one of {', '.join(LORA_TARGET_SETS)}, not {self.lora_targets!r}")
        need(self.lr > 0, "--lr must be > 0")
        need(self.steps >= 1, "--steps must be >= 1")
        need(self.batch_size >= 1, "--batch-size must be >= 1")
        need(self.micro_batch_size is None or self.micro_batch_size >= 1, "--micro-batch-size must be >= 1")
        need(self.checkpoint_every >= 1, "--checkpoint-every must be >= 1")
        need(self.threads >= 0, "--threads must be >= 0 (0: torch's default)")
        need(self.compile in ("auto", *COMPILE_CHOICES), f"--compile must be auto or one of {', '.join(COMPILE_CHOICES)}, not {self.compile!r}")
        need(self.attention in ATTENTION_BACKENDS, f"--attention must be one of {', '.join(ATTENTION_BACKENDS)}, not {self.attention!r}")
        need(self.compile_mode in COMPILE_MODES, f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, not {self.compile_mode!r}")
        need(all(s >= 1 for s in self.save_steps), "--save-steps must be positive step numbers")
        self.save_steps = sorted(set(self.save_steps))
        need(self.validation_every >= 0, "--validation-every must be >= 0 (0: no validation samples)")
        need(self.validation_images >= 1, "--validation-images must be >= 1")
        need(self.validation_steps >= 1, "--validation-steps must be >= 1")
        self._check_prior_preservation()
        try:
            resolve_report_to(self.report_to)
        except TrackingError as e:
            raise ConfigError(str(e)) from None
        if self.task_id:
            check_name(self.task_id, "task id", ConfigError, joined=True)

    def _check_prior_preservation(self) -> None:
        """The prior-preservation settings' values; given without --prior-preservation they are
        refused (they would do nothing), with it the unset ones take their defaults."""
        need(self.prior_weight is None or self.prior_weight > 0,
             f"--prior-weight must be > 0, not {self.prior_weight} (to train without the prior term, drop --prior-preservation)")
        need(self.num_class_images is None or self.num_class_images >= 1,
             f"--num-class-images must be >= 1, not {self.num_class_images}")
        need(self.class_image_steps is None or self.class_image_steps >= 1,
             f"--class-image-steps must be >= 1, not {self.class_image_steps}")
        given = [name for name, value in (("--prior-weight", self.prior_weight), ("--num-class-images", self.num_class_images),
                                          ("--class-image-steps", self.class_image_steps)) if value is not None]
        if not self.prior_preservation:
            need(not given, f"{' and '.join(given)} only apply with --prior-preservation: add --prior-preservation, "
                            f"or drop {' and '.join(given)}")
            return
        self.prior_weight = float(self.method_default("prior_weight", PRIOR_WEIGHT)) if self.prior_weight is None else float(self.prior_weight)
        self.num_class_images = self.method_default("num_class_images", NUM_CLASS_IMAGES) if self.num_class_images is None else self.num_class_images
        self.class_image_steps = CLASS_IMAGE_STEPS if self.class_image_steps is None else self.class_image_steps

    def _check_subjects_and_prompts(self) -> None:
        """Outputs outside the photos, one subject per placeholder, and each prompt checked once
        (CheckedPrompt), its length after every prompt's placeholders; fills in the clean prompt
        and the elements."""
        for s in self.subjects:  # (an image folder that does not exist fails later, naming it)
            need(not (Path(s.images).is_dir() and storage.is_under(self.output, s.images)),
                 f"--output {self.output} is (inside) the image folder {s.images} of {s.placeholder}; choose an output "
                 f"outside it (the run's files would be read as photos next time)")
        placeholders = [s.placeholder for s in self.subjects]
        need(len(set(placeholders)) == len(placeholders), f"each placeholder may have one subject; got {placeholders}")
        try:
            personal = [CheckedPrompt(s.personalization_prompt, {s.placeholder: s.class_word},
                                      what=f"personalization prompt of {s.placeholder}") for s in self.subjects]
            target = CheckedPrompt(self.target_prompt, self.class_words, clean=self.clean_prompt)
            self.clean_prompt = target.clean
            if self.elements is None:
                self.elements = elements_of(target)
            target.check_length(clean=True)
            for p in personal:
                p.check_length()
            if METHOD_TABLE[self.method].negative:
                check_token_length(self.negative_prompt, what="negative prompt")
            for p in self.validation_prompts:
                CheckedPrompt(p, self.class_words, what="validation prompt").check_length()
        except PromptError as e:
            raise ConfigError(str(e)) from e

    @property
    def class_words(self) -> dict[str, str]:
        return {s.placeholder: s.class_word for s in self.subjects}

    @property
    def init_words(self) -> dict[str, str]:
        """{placeholder: the word its token starts from} (--token-init)."""
        return token_init_words(self.token_init, self.class_words)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["subjects"] = [Subject(**s) for s in d["subjects"]]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def accumulation(self, num_processes: int, micro: int | None = None) -> tuple[int, int]:
        """(micro-batch, accumulation steps) with micro x accumulation x processes = batch;
        ``micro``: the one found for --micro-batch-size auto (default: the whole per-process batch)."""
        per_process, rest = divmod(self.batch_size, num_processes)
        if rest or not per_process:
            raise ConfigError(f"--batch-size {self.batch_size} is not divisible by the {num_processes} processes")
        micro = self.micro_batch_size or micro or per_process
        if per_process % micro:
            raise ConfigError(
                f"--batch-size {self.batch_size} over {num_processes} process(es) is {per_process} per process, "
                f"not a multiple of --micro-batch-size {micro}"
            )
        return micro, per_process // micro
