"""``palp sample``: images from a trained run, the way a diffusers user would make them.

The base model, LoRA and learned tokens are loaded with diffusers' own loaders
(``from_pretrained``, ``load_lora_weights``, ``load_textual_inversion``) into the stock
``StableDiffusionPipeline`` (a Custom Diffusion run's weights with diffusers' own
``CustomDiffusionAttnProcessor``, palp.models.custom_diffusion); ``generate`` then runs its denoising steps on every (prompt,
sample) pair in batches, with classifier-free guidance as one UNet call per step and no host
sync inside the loop (``--sampler stock`` calls the pipeline itself instead).

Sample *i* of prompt *p* starts from latents drawn from its own seed,
``hash(seed, p, i)``, so it is the same image whatever the batch size or however the work is
split; finished files are skipped, so a preempted job picks up where it stopped. A file's
path holds a hash of every setting that changes its pixels (seed, steps, guidance, scheduler,
precisions: ``settings_key``), so a rerun with other settings never reuses an image.

Layout: ``OUTPUT/<task>/<method>-<run hash>/<settings hash>/step-NNNNNN/<prompt hash>-sNN.png``
(the base model's reference samples: ``<task>/base/<settings hash>/step-000000/``), each
settings folder with its ``settings.json``; ``samples.csv`` (one row per image, with the
image's own clean prompt and prompt elements, so subjects that share a prompt never share
texts), ``prompts.json`` (the same texts per task, for people to read). That bookkeeping
(seeds, file names, batches, the tables) is ``palp.steps.sample_jobs``; the denoising loop,
decoding and PNG writing are ``palp.models.denoising``, shared with training's validation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from palp.core import gcs, storage, xla
from palp.core.elements import elements_of
from palp.core.locks import output_lock
from palp.core.memory import is_out_of_memory, release_memory
from palp.core.methods import LAYERED, PERSONALIZATIONS
from palp.core.precision import SAMPLE_PRECISIONS, sample_dtype
from palp.core.preemption import Preempted, StopRequests
from palp.core.prompts import CheckedPrompt, to_token_prompt
from palp.core.settings import SampleSettings as _S
from palp.core.settings import method_label
from palp.models.denoising import SCHEDULERS, build_pipeline, generate, initial_latents, is_xl, write_png
from palp.models.run_weights import CONFIG_FILE, CUSTOM_DIFFUSION_FILE, EMBEDS_FILE, LAYERED_FILE, LORA_FILE, xl_embeds
from palp.steps.sample_jobs import (SampleError, Weights, finished, make_jobs, merge_tables, prompt_key, settings_key,
                                    texts_by_task, unfinished_batches, write_settings)

log = logging.getLogger(__name__)

SAMPLERS = ("palp", "stock")
PRECISIONS = SAMPLE_PRECISIONS
REFERENCE_METHOD = "base"



def fetch_run(model: str, *, cache: Path) -> Path:
    """A local folder with the run's config, final weights and snapshots (not its checkpoints)."""
    if not gcs.is_gcs(model):
        path = Path(model)
        if not (path / CONFIG_FILE).is_file():
            raise SampleError(f"{model} is not a finished training run (no {CONFIG_FILE}); train it first")
        return path
    # The same folder a gs:// training run mirrors into: on the machine that trained, nothing is fetched.
    local = storage.cache_dir(model, cache=cache, kind="runs")
    if not storage.exists(storage.join(model, CONFIG_FILE)):
        raise SampleError(f"{model} is not a finished training run (no {CONFIG_FILE}); train it first")
    for name in storage.list_files(model, recursive=True):
        if name in (CONFIG_FILE, LORA_FILE, CUSTOM_DIFFUSION_FILE, LAYERED_FILE, EMBEDS_FILE) or name.startswith("snapshots/"):
            if not (local / name).exists():
                storage.write_bytes(local / name, storage.read_bytes(storage.join(model, name)))
    return local


def weights_to_sample(run: Path, checkpoints: str, reference: bool) -> list[Weights]:
    if reference:
        return [Weights(0, None)]
    config = json.loads((run / CONFIG_FILE).read_text())
    final, personalize = config["completed_steps"], config.get("personalize") or "lora-token"
    found = [Weights(final, run, personalize)]
    if checkpoints == "all":
        snaps = sorted((run / "snapshots").glob("step-*")) if (run / "snapshots").is_dir() else []
        found = [Weights(int(p.name.split("-")[1]), p, personalize) for p in snaps if int(p.name.split("-")[1]) != final] + found
    elif checkpoints != "final":
        raise SampleError(f"--checkpoints must be all or final, not {checkpoints!r}")
    return found


def load_weights(pipe, folder: Path, personalize: str = "lora-token", *, truncation: int | None = None) -> None:
    """Swap in one set of LoRA (or Custom Diffusion weights, as the run's ``personalize`` says) +
    embeddings with diffusers' loaders (unloading any previous set).

    Custom Diffusion's weights go in through diffusers' ``CustomDiffusionAttnProcessor`` set by
    palp (custom_diffusion.set_custom_diffusion_processors), which checks they are in place:
    diffusers' ``unet.load_attn_procs(folder, weight_name=...)`` called without its private
    ``_pipeline`` argument reads the file and sets nothing (docs/training.md)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from palp.models.layered_pipeline import install_layered_tokens, remove_layered_tokens

    if personalize not in PERSONALIZATIONS:
        raise SampleError(f"the run trained {personalize!r}, which this palp cannot sample; use a newer palp")
    remove_layered_tokens(pipe)
    pipe.unload_lora_weights()
    pairs = [(pipe.tokenizer, pipe.text_encoder)] + ([(pipe.tokenizer_2, pipe.text_encoder_2)] if is_xl(pipe) else [])
    for tokenizer, encoder in pairs:
        device = encoder.device
        if xla.is_xla(device):  # diffusers' unload assigns the kept rows to a new CPU nn.Embedding: refused for XLA tensors
            encoder.to("cpu")
        pipe.unload_textual_inversion(tokenizer=tokenizer, text_encoder=encoder)
        encoder.to(device)
    if personalize in LAYERED:  # P+'s per-layer tokens or NeTI's mappers, through palp's processors
        try:
            install_layered_tokens(pipe, folder / LAYERED_FILE, truncation=truncation)
        except (ValueError, OSError, SafetensorError) as e:
            raise SampleError(f"{folder / LAYERED_FILE}: {e}") from e
        return
    if personalize == "custom-diffusion":
        from palp.models.custom_diffusion import set_custom_diffusion_processors

        try:
            set_custom_diffusion_processors(pipe.unet, load_file(folder / CUSTOM_DIFFUSION_FILE))
        except (ValueError, OSError) as e:
            raise SampleError(f"{folder / CUSTOM_DIFFUSION_FILE}: {e}") from e
    else:
        pipe.load_lora_weights(folder)
    xl = xl_embeds(folder / EMBEDS_FILE)
    if is_xl(pipe) != (xl is not None):
        raise SampleError(f"{folder / EMBEDS_FILE} holds {'SDXL' if xl else 'Stable Diffusion 1.x/2.x'} embeddings, "
                          f"the base model is {'SDXL' if is_xl(pipe) else 'Stable Diffusion 1.x/2.x'}")
    if xl is not None:  # one (1, D) row per token into each encoder, as docs/training.md shows
        tokens, clip_l, clip_g = xl
        for rows, tokenizer, encoder in ((clip_l, pipe.tokenizer, pipe.text_encoder), (clip_g, pipe.tokenizer_2, pipe.text_encoder_2)):
            pipe.load_textual_inversion(list(rows.split(1)), token=tokens, text_encoder=encoder, tokenizer=tokenizer)
        return
    embeds = load_file(folder / EMBEDS_FILE)
    pipe.load_textual_inversion(list(embeds.values()), token=list(embeds))



def texts_to_sample(config: dict, *, prompts: list[str] | None, tasks: list[str] | None, prepared: str | None) -> list[dict]:
    """What to sample, ``{task, prompt, clean_prompt, elements}`` each: the run's target prompt,
    other ``prompts`` of its task, or the target prompts of prepared ``tasks``.

    A task other than the run's own must have the run's subjects (same placeholders, class
    words and personalization prompts), and the run's training must not have read its target
    prompt (TI+DB), so that the weights are the ones a run for that task would have learned."""
    from palp.core.settings import PROMPT_FREE_METHODS
    from palp.steps.prepare import PrepareError, load_manifest, subject_key

    own = config.get("task_id", "")
    words = config["class_words"]
    if tasks:
        if prompts:
            raise SampleError("give --prompts or --task, not both")
        if not prepared:
            raise SampleError("--task needs --prepared: the prepared dataset that holds the tasks")
        try:
            manifest = load_manifest(prepared)
        except PrepareError as e:
            raise SampleError(str(e)) from e
        by_id = {t["id"]: t for t in manifest["tasks"]}
        unknown = [t for t in tasks if t not in by_id]
        if unknown:
            raise SampleError(f"no task {unknown[0]!r} in {prepared}; tasks: {', '.join(by_id)}")
        mine = by_id.get(own)
        out = []
        for t in dict.fromkeys(tasks):
            task = by_id[t]
            if t != own:
                if config["method"] not in PROMPT_FREE_METHODS:
                    raise SampleError(
                        f"the run trained {config['method']} for task {own or '(none)'}, whose training depends on its "
                        f"target prompt: it cannot stand in for task {t}; train that task, or sample the run's own task")
                if mine is None or subject_key(mine) != subject_key(task):
                    raise SampleError(f"task {t} has other subjects than the run (trained for task {own or '(none)'}): "
                                      f"sample only tasks of the run's own subjects")
            out.append({"task": t, "prompt": task["prompt"], "clean_prompt": task["clean_prompt"],
                        "elements": task["elements"]})
        return out
    out = []
    for p in dict.fromkeys(prompts or [config["target_prompt"]]):
        prompt = CheckedPrompt(p, words, what="--prompts entry")
        prompt.check_length()  # the limit training applies: a longer prompt would be cut silently
        explicit = p == config["target_prompt"]
        out.append({"task": own, "prompt": p, "clean_prompt": config["clean_prompt"] if explicit else prompt.clean,
                    "elements": (config.get("elements") if explicit else None) or elements_of(prompt)})
    return out


def _check_options(*, num_samples: int, batch_size: int, steps: int, sampler: str, compile: str, attention: str,
                   precision: str, vae_precision: str) -> None:
    from palp.core import settings

    if num_samples < 1 or batch_size < 1 or steps < 1:
        raise SampleError("--num-samples, --batch-size and --steps must be >= 1")
    if sampler not in SAMPLERS:
        raise SampleError(f"--sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
    if compile not in ("auto", *settings.COMPILE_CHOICES):
        raise SampleError(f"--compile must be auto or one of {', '.join(settings.COMPILE_CHOICES)}, not {compile!r}")
    if attention not in settings.ATTENTION_BACKENDS:
        raise SampleError(f"--attention must be one of {', '.join(settings.ATTENTION_BACKENDS)}, not {attention!r}")
    for flag, value in (("--precision", precision), ("--vae-precision", vae_precision)):
        if value not in PRECISIONS:
            raise SampleError(f"{flag} must be one of {', '.join(PRECISIONS)}, not {value!r}")


def sample(model: str, output: str, *, prompts: list[str] | None = None, tasks: list[str] | None = None,
           prepared: str | None = None, num_samples: int = _S.num_samples, seed: int = _S.seed,
           steps: int = _S.steps, scheduler: str = _S.scheduler, guidance: float = _S.guidance, batch_size: int = _S.batch_size,
           checkpoints: str = _S.checkpoints, reference: bool = False, precision: str = "auto",
           device: str | None = None, progress: bool = True, sampler: str = "palp", vae_precision: str = "auto",
           compile: str = "auto", compile_cache: str = "", attention: str = "auto",
           neti_truncation: int | None = None) -> list[dict]:
    """Sample a trained run (or, with ``reference``, its base model on the clean prompts):
    its target prompt, other ``prompts``, or the target prompts of ``tasks`` of the
    ``prepared`` dataset (``texts_to_sample``).

    ``sampler``: ``palp`` (``generate``: the stock pipeline's steps without its per-step host
    syncs) or ``stock`` (the pipeline's ``__call__``). ``vae_precision``: the decoder's dtype
    (``auto``: the model's). ``compile``/``compile_cache``: as for training (palp sampler only);
    ``attention``: the SDPA kernel (fast.attention_backend). ``neti_truncation`` (NeTI runs):
    the mapper's hidden units kept (``install_layered_tokens``); None keeps them all.
    """
    from palp.core.cache import cache_root
    from palp.models import speed as fast

    storage.check_folder_output(output)
    _check_options(num_samples=num_samples, batch_size=batch_size, steps=steps, sampler=sampler, compile=compile,
                   attention=attention, precision=precision, vae_precision=vae_precision)
    run = fetch_run(model, cache=cache_root())
    config = json.loads((run / CONFIG_FILE).read_text())
    _check_truncation(neti_truncation, config, model=model, reference=reference)
    texts = texts_to_sample(config, prompts=prompts, tasks=tasks, prepared=prepared)
    weights = weights_to_sample(run, checkpoints, reference)
    method, subject, run_tag = _run_names(config, texts, model=model, reference=reference)
    device_, dtype, vae_dtype, settings = _pixel_settings(seed=seed, steps=steps, guidance=guidance, scheduler=scheduler,
                                                          device=device, precision=precision, vae_precision=vae_precision,
                                                          fp32_vae_for_fp16=config.get("model_family") == "sdxl")
    if neti_truncation is not None:  # other pixels: another settings folder (absent otherwise, keeping older keys)
        settings["neti_truncation"] = neti_truncation
    key = settings_key(settings)
    jobs = make_jobs(texts, weights, num_samples=num_samples, seed=seed, key=key, run_tag=run_tag, subject=subject,
                     method=method, model=model)
    # One writer per output (locks.py); the table merge below reads and rewrites samples.csv.
    # SIGTERM/SIGINT stops at once: the images already written are whole files (each written
    # atomically) and are kept, the lock is released, and a rerun makes only the rest.
    with StopRequests("palp sample", immediate=True), output_lock(output, "palp sample", wait=True) as held, \
            _kept_on_stop(output, [j["file"] for j in jobs]):
        done = finished(output)
        todo = unfinished_batches(jobs, weights, batch_size, done)
        remaining = sum(len(b) for b in todo)
        bar = tqdm(total=len(jobs), initial=len(jobs) - remaining, desc=f"palp sample ({method})", unit="img", disable=not progress)
        if todo:
            write_settings(output, texts, run_tag, key, settings)
            pipe, compiled = _load_pipeline(config, scheduler=scheduler, device=device_, dtype=dtype, vae_dtype=vae_dtype,
                                            sampler=sampler, compile=compile, compile_cache=compile_cache)
            with fast.attention_backend(attention):
                _render(pipe, compiled, todo, output=output, reference=reference, sampler=sampler, steps=steps,
                        neti_truncation=neti_truncation,
                        guidance=guidance, batch_size=batch_size, dtype=dtype,
                        on_batch=lambda batch: bar.update(sum(j["file"] not in done for j in batch)))
        bar.close()
        rows = [{k: v for k, v in j.items() if not k.startswith("_")} for j in jobs]
        held.check()
        merge_tables(output, rows, texts_by_task(texts))
        return rows


@contextlib.contextmanager
def _kept_on_stop(output: str, files: list[str]):
    """A stop request's Preempted, its message saying how many of this call's images are kept."""
    try:
        yield
    except Preempted as e:
        kept = len(set(files) & finished(output))
        raise Preempted(e.signum, f"{e}: {kept} of {len(files)} images are written in {output} and kept; rerun the "
                                  f"same command to make the rest") from None


def _check_truncation(truncation: int | None, config: dict, *, model: str, reference: bool) -> None:
    """--neti-truncation: refused for a run that is not NeTI's (or with --reference) and outside
    1..the run's mapper width."""
    if truncation is None:
        return
    personalize = config.get("personalize") or "lora-token"
    if reference or personalize != "neti":
        what = "--reference samples the base model" if reference else f"{model} trained --personalize {personalize}"
        raise SampleError(f"--neti-truncation applies to NeTI runs only ({what}); drop --neti-truncation")
    hidden = int(config.get("neti_hidden") or 0)
    if not 1 <= truncation <= hidden:
        raise SampleError(f"--neti-truncation must be between 1 and the run's {hidden} mapper units (--neti-hidden), not {truncation}")


def _run_names(config: dict, texts: list[dict], *, model: str, reference: bool) -> tuple[str, str, str]:
    """(method label, subject, run tag) of a run; sets each text's task ``folder``."""
    from palp.core.names import check_name

    method = REFERENCE_METHOD if reference else method_label(config["method"], config.get("noise", "same"),
                                                             config.get("personalize") or "lora-token")
    subject = "+".join(s["name"] for s in config["subjects"])
    for entry in texts:  # a task id (from the run's config or the manifest) becomes a folder name
        entry["folder"] = check_name(entry["task"] or subject, "task id", SampleError, joined=True)
    # Several runs may share one output folder: each writes under its own tag (the base
    # model's samples depend only on the task, so runs of one task share them).
    run_tag = method if reference else f"{method}-{prompt_key(str(model).rstrip('/'))[:6]}"
    return method, subject, run_tag


def _pixel_settings(*, seed: int, steps: int, guidance: float, scheduler: str, device: str | None, precision: str,
                    vae_precision: str, fp32_vae_for_fp16: bool = False) -> tuple[torch.device, torch.dtype, torch.dtype, dict]:
    """(device, dtype, VAE dtype, the settings that decide the pixels: ``settings.json``).
    ``fp32_vae_for_fp16``: an SDXL run, whose VAE overflows in fp16: ``--vae-precision auto``
    decodes fp16 samples in fp32, as the stock pipeline does (its VAE config's force_upcast)."""
    if scheduler not in SCHEDULERS:
        raise SampleError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, not {scheduler!r}")
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = sample_dtype(device_, precision)
    vae_dtype = dtype if vae_precision == "auto" else sample_dtype(device_, vae_precision)
    if vae_precision == "auto" and fp32_vae_for_fp16 and dtype == torch.float16:
        vae_dtype = torch.float32
    # What decides the pixels; not --sampler (both samplers make the same images, tested) nor
    # the speed options (compile, attention kernel, batch size).
    settings = {"seed": seed, "steps": steps, "guidance": guidance, "scheduler": scheduler,
                "dtype": str(dtype), "vae_dtype": str(vae_dtype)}
    return device_, dtype, vae_dtype, settings


def _load_pipeline(config: dict, *, scheduler: str, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype,
                   sampler: str, compile: str, compile_cache: str):
    """(the stock pipeline of the run's base model, its UNet behind ``fast.CompiledUNet``)."""
    from palp.models import speed as fast
    from palp.models.base_model import resolve_model

    # The base model as the run names it, resolved again on this machine and checked
    # against the pin of the weights it was trained on (never the trainer's cache path).
    base = resolve_model(config["pretrained_model"], pin=config.get("base_model_pin"))
    pipe = build_pipeline(base.path, scheduler=scheduler, device=device, dtype=dtype, vae_dtype=vae_dtype)
    compiled = fast.CompiledUNet(pipe.unet, fast.resolve_compile(compile, device) if sampler == "palp" else "none",
                                 device=device, cache_folder=compile_cache, logger=log)
    return pipe, compiled


def _make_images(pipe, compiled, part: list[dict], *, size: int, reference: bool, sampler: str, steps: int,
                 guidance: float, dtype: torch.dtype) -> np.ndarray:
    """(len(part), H, W, 3) uint8 images of one batch of jobs, each from its own seed's noise;
    a compiled sampler pads the batch to ``size`` rows, so every batch has one shape."""
    latent_shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    text = [to_token_prompt(j["clean_prompt"] if reference else j["prompt"]) for j in part]
    latents = initial_latents([j["seed"] for j in part], latent_shape)
    if sampler == "stock":
        images = pipe(text, num_inference_steps=steps, guidance_scale=guidance,
                      latents=latents.to(pipe.unet.device, dtype), output_type="np").images
        return (images * 255).round().astype(np.uint8)  # as the pipeline's own PIL output
    pad = size - len(part) if compiled.active else 0
    rows = (text + text[-1:] * pad, torch.cat([latents, latents[-1:].expand(pad, -1, -1, -1)]))
    return compiled.call(lambda: generate(pipe, *rows, steps=steps, guidance=guidance)[: len(part)], doing="sampling")


def _render(pipe, compiled, todo: list[list[dict]], *, output: str, reference: bool, sampler: str, steps: int,
            guidance: float, batch_size: int, dtype: torch.dtype, on_batch, neti_truncation: int | None = None) -> None:
    """Make and write every batch of ``todo``, swapping in each batch's weights; PNG encoding
    and writing (slow on gs://) run beside the device's work on the next batch.

    A batch that runs out of device memory is made in halves, and the size that fits is used
    from then on (said once on stderr): ``--batch-size`` is the most a batch holds. Each image's
    noise comes from its own seed, so the images are those of a run given that size."""
    loaded, writes, size = None, [], batch_size

    def fitting(part: list[dict]) -> np.ndarray:
        nonlocal size
        try:
            return _make_images(pipe, compiled, part, size=size, reference=reference, sampler=sampler, steps=steps,
                                guidance=guidance, dtype=dtype)
        except Exception as e:  # noqa: BLE001 (only out-of-memory is caught; anything else is raised again)
            if not is_out_of_memory(e):
                raise
        release_memory(pipe.unet.device)
        if len(part) == 1:
            raise SampleError(f"one image does not fit in the memory of {pipe.unet.device}; use a device with more "
                              f"memory or --precision fp16/bf16") from None
        half = (len(part) + 1) // 2  # a local: the first half's own back-off may lower ``size`` again
        size = min(size, half)
        print(f"palp sample: a batch of {len(part)} ran out of memory on {pipe.unet.device}; batches of {size} from now "
              f"on", file=sys.stderr)
        return np.concatenate([fitting(part[:half]), fitting(part[half:])])

    with ThreadPoolExecutor(max_workers=WRITERS) as writer:
        _start_all(writer, WRITERS)  # before the batches fill memory: a thread needs its stack mapped
        for whole in todo:
            w = whole[0]["_weights"]
            if w is not loaded and w.folder is not None:
                load_weights(pipe, w.folder, w.personalize, truncation=neti_truncation)
            loaded = w
            done = 0
            while done < len(whole):
                batch = whole[done : done + size]  # the size that fits so far
                images = fitting(batch)
                compiled.save_once()
                for j, im in zip(batch, images):
                    writes.append(writer.submit(write_png, storage.join(output, j["file"]), im))
                for f in [f for f in writes if f.done()]:
                    f.result()  # a failed write stops the run
                on_batch(batch)
                done += len(batch)
        for f in writes:
            f.result()


WRITERS = 4  # PNG writer threads beside the device's work


def _start_all(pool: ThreadPoolExecutor, n: int) -> None:
    """Start the pool's ``n`` threads now (a pool starts them lazily, one per busy submit)."""
    import threading

    gate = threading.Barrier(n + 1)
    for _ in range(n):
        pool.submit(gate.wait)
    gate.wait()


