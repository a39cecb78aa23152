"""The palp DAG: prepare -> ParallelFor(training: train -> sample -> score) -> compare.

A training is one (task, method), except for TI+DB, whose training ignores the target prompt:
it is trained once per subject and samples every prompt of that subject
(``palp.steps.prepare.fan_out``).

Wiring only: every step is a component from ``components``. Resources are set per backend at
compile time (``build_pipeline(backend=...)``), but for the train step's accelerator count, the
``train_accelerators`` parameter (one training process per accelerator); locally the resources
are ignored and ``train_accelerators`` processes train on the CPU.
"""


from dataclasses import dataclass
from typing import Optional

from kfp import dsl

from components import Components, default_image, make_components
from palp.core.settings import DEFAULT_SAVE_STEPS
from palp.core.settings import SampleSettings as Sa
from palp.core.settings import ScoreSettings as Sc
from palp.core.settings import StudySettings as St
from palp.core.settings import TrainConfig as T
from palp.steps.launch import DEFAULT_PROCESSES
from pipelines.errors import PipelineError
from pipelines.quota import DEFAULT_MAX_PARALLEL

PIPELINE_NAME = "palp"
BACKENDS = ("vertex", "kubeflow", "vertex-tpu")
VERTEX_GPUS = ("NVIDIA_L4", "NVIDIA_TESLA_A100", "NVIDIA_A100_80GB", "NVIDIA_H100_80GB", "NVIDIA_H200_141GB", "NVIDIA_TESLA_T4")
# TPU accelerator -> (machine type, chips) of a Vertex custom job.
VERTEX_TPUS = {"TPU_V3": ("cloud-tpu", 8), "TPU_V5_LITE_PODSLICE": ("ct5lp-hightpu-4t", 4)}
DEFAULT_ACCELERATOR = {"vertex": "NVIDIA_L4", "kubeflow": "nvidia.com/gpu", "vertex-tpu": "TPU_V5_LITE_PODSLICE"}


@dataclass(frozen=True)
class Resources:
    cpu: str
    memory: str
    gpu: bool


STEP_RESOURCES = {
    "prepare": Resources("4", "16G", False),
    "train": Resources("8", "64G", True),
    "sample": Resources("8", "32G", True),
    "score": Resources("4", "16G", True),
    "compare": Resources("4", "16G", False),
}


def _configure(task, step: str, backend: str, accelerator: str, count=1):
    """Resources of a step's task; ``count``: its accelerators (a number or a pipeline parameter)."""
    r = STEP_RESOURCES[step]
    task.set_cpu_limit(r.cpu).set_memory_limit(r.memory).set_caching_options(True)
    if r.gpu and not (backend == "vertex-tpu" and step == "train"):
        gpu = accelerator if backend != "vertex-tpu" else DEFAULT_ACCELERATOR["vertex"]
        task.set_accelerator_type(gpu).set_accelerator_limit(count)
    return task


def _tpu_train(comps: Components, accelerator: str, image: Optional[str]):
    """The train component as a Vertex custom job on TPU (google-cloud-pipeline-components)."""
    from google_cloud_pipeline_components.v1.custom_job import create_custom_training_job_from_component

    from components import make_components as make

    tpu_train = make(image or default_image("tpu")).train
    machine, chips = VERTEX_TPUS[accelerator]
    return create_custom_training_job_from_component(
        tpu_train, display_name="palp-train-tpu", machine_type=machine, accelerator_type=accelerator,
        accelerator_count=chips, env=[{"name": "PJRT_DEVICE", "value": "TPU"}],
    )


def check_backend(backend: str, accelerator: Optional[str]) -> str:
    if backend not in BACKENDS:
        raise PipelineError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    accelerator = accelerator or DEFAULT_ACCELERATOR[backend]
    if backend == "vertex" and accelerator not in VERTEX_GPUS:
        raise PipelineError(f"Vertex accelerator {accelerator!r} unknown; use one of {', '.join(VERTEX_GPUS)}")
    if backend == "vertex-tpu" and accelerator not in VERTEX_TPUS:
        raise PipelineError(f"Vertex TPU {accelerator!r} unknown; use one of {', '.join(VERTEX_TPUS)}")
    return accelerator


# The pipeline's defaults are the library's (palp.core.settings), except these, each with its reason
# (tests/test_defaults.py holds every other parameter to the library's default).
DIFFERENT_DEFAULTS = {
    "mixed_precision": ("bf16", "the pipeline trains on GPUs, where bf16 halves memory and time; the library's "
                                "default, fp32, runs on every CPU and reproduces bit for bit"),
    "micro_batch_size": (0, "a KFP parameter cannot be None: 0 is the library's None (auto: the largest micro-batch that "
                               "fits the device's memory, found before the first step)"),
    "prior_weight": (0.0, "a KFP parameter cannot be None: 0 is the library's None (with prior_preservation, diffusers' "
                          "DreamBooth default 1.0; without, unset)"),
    "num_class_images": (0, "a KFP parameter cannot be None: 0 is the library's None (with prior_preservation, diffusers' "
                            "DreamBooth default 100, Custom Diffusion's 200; without, unset)"),
    # Settings whose default depends on the method (palp.core.methods): each training takes its method's
    "train_steps": (0, "a KFP parameter cannot be None: 0 is the library's None (each method's default steps: 500, "
                       "custom-diffusion 250, p-plus 500, neti 1000)"),
    "batch_size": (0, "a KFP parameter cannot be None: 0 is the library's None (each method's default batch: 32, "
                      "custom-diffusion 2, p-plus and neti 8)"),
    "lr": (0.0, "a KFP parameter cannot be None: 0 is the library's None (each training's default learning rate: "
                "5e-5, 1e-5 over Custom Diffusion, 5e-3 over P+, 8e-3 over NeTI)"),
    "lora_rank": (0, "a KFP parameter cannot be None: 0 is the library's None (rank 32; LoRA runs only, the "
                     "Custom Diffusion, P+ and NeTI variants have no rank)"),
    "prior_preservation": (False, "a KFP parameter cannot be None: False is the library's None (each method's "
                                  "default: off, on for custom-diffusion); True turns it on for every method"),
}


def build_pipeline(backend: str = "kubeflow", accelerator: Optional[str] = None, image: Optional[str] = None,
                   retries: bool = True, max_parallel: int = DEFAULT_MAX_PARALLEL, train_image: Optional[str] = None):
    """The pipeline function for one backend (resources differ; the DAG is the same).

    ``retries=False`` drops the preemption retries, for local runs where a failure is final.
    ``max_parallel``: trainings at once (the ParallelFor's parallelism, in the compiled YAML).
    ``train_image``: the train step's image, where it differs from the other steps' (local runs:
    the tpu image; the vertex-tpu backend takes the tpu image by itself).
    (Longer than most functions here: the inner pipeline function's parameter list is the
    pipeline's interface, grouped by step, and KFP needs it spelled out.)"""
    accelerator = check_backend(backend, accelerator)
    if not isinstance(max_parallel, int) or max_parallel < 1:
        raise PipelineError(f"--max-parallel must be a whole number >= 1, not {max_parallel!r}")
    comps = make_components(image)
    train_op = _tpu_train(comps, accelerator, None if image is None else image) if backend == "vertex-tpu" else \
        make_components(train_image).train if train_image else comps.train

    @dsl.pipeline(name=PIPELINE_NAME, description="PALP: prompt-aligned personalization, compared across methods")
    def palp_pipeline(
        # what to personalize, the base model, and the scoring CLIP and judge
        subjects: list, prompts: list = [], prompts_file: str = "", methods: list = ["palp", "ti-db"],
        pretrained_model: str = T.pretrained_model, clip_model: str = Sc.clip_model, clip_weights: str = Sc.clip_weights,
        judge: str = Sc.judge,
        # train
        train_steps: int = DIFFERENT_DEFAULTS["train_steps"][0], batch_size: int = DIFFERENT_DEFAULTS["batch_size"][0],
        micro_batch_size: int = DIFFERENT_DEFAULTS["micro_batch_size"][0], lr: float = DIFFERENT_DEFAULTS["lr"][0],
        lam: float = T.lam, alpha: float = T.alpha, beta: float = T.beta,
        lora_rank: int = DIFFERENT_DEFAULTS["lora_rank"][0], lora_targets: str = T.lora_targets,
        prior_preservation: bool = DIFFERENT_DEFAULTS["prior_preservation"][0],
        prior_weight: float = DIFFERENT_DEFAULTS["prior_weight"][0],
        num_class_images: int = DIFFERENT_DEFAULTS["num_class_images"][0],
        save_steps: str = ",".join(map(str, DEFAULT_SAVE_STEPS)), checkpoint_every: int = T.checkpoint_every,
        validation_every: int = T.validation_every, mixed_precision: str = DIFFERENT_DEFAULTS["mixed_precision"][0],
        seed: int = T.seed, train_accelerators: int = DEFAULT_PROCESSES,
        # sample
        num_samples: int = Sa.num_samples, sample_steps: int = Sa.steps, sample_batch_size: int = Sa.batch_size,
        scheduler: str = Sa.scheduler, guidance: float = Sa.guidance, checkpoints: str = Sa.checkpoints,
        reference: bool = False,
        # the study's forms, and the inputs' digest (the prepare step's cache key follows the data)
        study_forms: int = St.forms, study_seed: int = St.seed, study_image_size: int = St.image_size,
        inputs_fingerprint: str = "",
    ):
        prep = _configure(comps.prepare(subjects=subjects, prompts=prompts, prompts_file=prompts_file, methods=methods,
                                        pretrained_model=pretrained_model, clip_model=clip_model, clip_weights=clip_weights,
                                        inputs_fingerprint=inputs_fingerprint),
                          "prepare", backend, accelerator)
        prep.set_display_name("prepare")
        with dsl.ParallelFor(prep.outputs["Output"], name="trainings", parallelism=max_parallel) as run:
            tr = _configure(train_op(prepared=prep.outputs["prepared"], task=run.task_id, method=run.method,
                                     pretrained_model=pretrained_model, steps=train_steps, batch_size=batch_size,
                                     micro_batch_size=micro_batch_size, lr=lr, lam=lam, alpha=alpha, beta=beta,
                                     lora_rank=lora_rank, lora_targets=lora_targets,
                                     save_steps=save_steps,
                                     checkpoint_every=checkpoint_every, mixed_precision=mixed_precision, seed=seed,
                                     validation_every=validation_every, processes=train_accelerators,
                                     prior_preservation=prior_preservation, prior_weight=prior_weight,
                                     num_class_images=num_class_images),
                            "train", backend, accelerator, train_accelerators)
            if retries:  # preemption: the retried task resumes from its checkpoints
                tr.set_retry(num_retries=3, backoff_duration="60s", backoff_factor=2.0)
            sa = _configure(comps.sample(model=tr.outputs["model"], prepared=prep.outputs["prepared"], tasks=run.tasks,
                                         num_samples=num_samples, steps=sample_steps,
                                         batch_size=sample_batch_size, scheduler=scheduler, guidance=guidance,
                                         checkpoints=checkpoints, reference=reference, seed=seed),
                            "sample", backend, accelerator)
            if retries:  # resumable: finished images are kept
                sa.set_retry(num_retries=3, backoff_duration="60s")
            _configure(comps.score(samples=sa.outputs["samples"], prepared=prep.outputs["prepared"], clip_model=clip_model,
                                   clip_weights=clip_weights, judge=judge), "score", backend, accelerator)
        _configure(comps.compare(samples=dsl.Collected(sa.outputs["samples"]), prepared=prep.outputs["prepared"],
                                 clip_model=clip_model, clip_weights=clip_weights, judge=judge, forms=study_forms, study_seed=study_seed,
                                 study_image_size=study_image_size), "compare", backend, accelerator)

    return palp_pipeline


def compile_pipeline(backend: str, output: str, *, accelerator: Optional[str] = None, image: Optional[str] = None,
                     max_parallel: int = DEFAULT_MAX_PARALLEL) -> str:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(backend, accelerator, image, max_parallel=max_parallel), package_path=output)
    return output


def fan_out_size(params: dict) -> int:
    """How many trainings an experiment's parameters fan out to (what prepare will return:
    palp.steps.prepare.fan_out over its tasks), counted without reading any photo. A prompts file
    that is not on this machine is not read (its prompts are not counted)."""
    from palp.steps.prepare import PromptSpec, build_tasks, fan_out, load_prompts_file, subject_specs

    subjects = {s.name: s for s in subject_specs(params["subjects"])}
    prompts = [PromptSpec(p) for p in params.get("prompts") or []]
    if params.get("prompts_file") and "://" not in str(params["prompts_file"]):
        prompts += load_prompts_file(params["prompts_file"])
    words = {n: s.class_word or "thing" for n, s in subjects.items()}  # any word: only the count is wanted
    tasks = build_tasks(subjects, prompts, words)
    return len(fan_out({"tasks": tasks}, list(params.get("methods") or ["palp", "ti-db"])))
