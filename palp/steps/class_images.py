"""DreamBooth's class images for prior preservation (``palp train --prior-preservation``).

For each class word of a run, ``--num-class-images`` images that the *base model* (no LoRA,
no learned token) makes of the class prompt "A photo of a <class word>", sampled as ``palp
sample`` samples (``palp.models.denoising.generate``: DDIM, classifier-free guidance 7.5,
image *i* from the seed ``sample_seed(seed, prompt, i)``, fp16 on CUDA and fp32 elsewhere).

A set is cached under palp's cache (``$PALP_CACHE/class-images/<key>/``), its key a hash of
everything that decides its pixels (:func:`class_image_spec`: the base model's pin, the
prompt, the count, the resolution, the sampler and its steps, guidance, seed and precision,
the device kind), so any run or pipeline step that shares the cache and asks for the same set
reuses it, and any change gives a new key. A set is written into a temporary folder that
becomes the set by one rename, its ``manifest.json`` (the spec and each image's sha256)
written last; a set whose manifest is missing, names another spec, or whose images are
missing or differ from their digests is regenerated, never partly used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from palp.core import storage
from palp.core.prompts import DEFAULT_PERSONALIZATION_PROMPT, DEFAULT_PLACEHOLDER, clean_prompt
from palp.core.settings import CLASS_IMAGE_GUIDANCE, CLASS_IMAGE_SEED

FOLDER = "class-images"  # under palp's cache
MANIFEST = "manifest.json"
SCHEDULER = "ddim"
# The layout of a set and the sampler that makes it; raised when either changes the pixels.
FORMAT = 1
BATCH = 8  # images per sampling batch (each from its own seed: the batch size changes no image)


def class_prompt(class_word: str) -> str:
    """The class prompt of a class word: the default personalization prompt with the class
    word for the placeholder ("A photo of a cat", "A photo of an owl")."""
    return clean_prompt(DEFAULT_PERSONALIZATION_PROMPT, {DEFAULT_PLACEHOLDER: class_word})


def image_name(i: int) -> str:
    return f"class-{i:05d}.png"


def class_image_spec(*, model_pin: str, prompt: str, count: int, resolution: int, steps: int, device: torch.device,
                     dtype: torch.dtype, guidance: float = CLASS_IMAGE_GUIDANCE, seed: int = CLASS_IMAGE_SEED) -> dict:
    """Everything that decides a set's pixels (its cache key is the hash of this)."""
    return {"format": FORMAT, "model_pin": model_pin, "prompt": prompt, "count": count, "resolution": resolution,
            "sampler": "palp", "scheduler": SCHEDULER, "steps": steps, "guidance": guidance, "seed": seed,
            "dtype": str(dtype), "device": device.type}


def spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def set_folder(spec: dict) -> Path:
    from palp.core.cache import cache_root

    return cache_root() / FOLDER / spec_key(spec)


@dataclass
class ClassImageSet:
    """A complete set in the cache: its folder, spec and images' digest."""

    folder: Path
    spec: dict
    digest: str  # sha256 over the images' names and bytes (the manifest's content)
    generated: bool  # made by this call (False: found in the cache)

    @property
    def key(self) -> str:
        return self.folder.name

    def files(self) -> list[Path]:
        return [self.folder / image_name(i) for i in range(self.spec["count"])]

    def record(self) -> dict:
        """What the run's training_config.json records of the set."""
        return {**self.spec, "key": self.key, "digest": self.digest}


def complete_set(folder: Path, spec: dict) -> str | None:
    """The set's digest if ``folder`` holds the complete set of ``spec`` (manifest, every image
    with its recorded sha256); None otherwise."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    names = [image_name(i) for i in range(spec["count"])]
    images = manifest.get("images") if isinstance(manifest, dict) else None
    if manifest.get("spec") != spec or not isinstance(images, dict) or sorted(images) != names:
        return None
    for name in names:
        path = folder / name
        if not path.is_file() or storage.file_digest(path) != images[name]:
            return None
    return hashlib.sha256(json.dumps(images, sort_keys=True).encode()).hexdigest()


def ensure_class_images(base_path: str | Path, spec: dict, *, device: torch.device, dtype: torch.dtype,
                        progress: bool = True, announce: bool = True) -> ClassImageSet:
    """The cached set of ``spec``, generated with the base model at ``base_path`` on ``device``
    in ``dtype`` (the ones ``spec`` names) if the cache does not hold it complete.
    ``announce``: say on stderr whether it was reused or made."""
    folder = set_folder(spec)
    digest = complete_set(folder, spec)
    what = f"{spec['count']} class images of {spec['prompt']!r}"
    if digest is not None:
        if announce:
            print(f"palp train: prior preservation: reusing {what} from {folder}", file=sys.stderr)
        return ClassImageSet(folder, spec, digest, generated=False)
    if folder.exists():  # a partial or damaged set: made again, whole
        if announce:
            print(f"palp train: prior preservation: {folder} is incomplete or damaged; generating it again", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    if announce:
        print(f"palp train: prior preservation: generating {what} with the base model into {folder}", file=sys.stderr)
    with storage.atomic_directory(folder) as tmp:  # another process that finished it first keeps its set
        images = _generate(base_path, spec, tmp, device=device, dtype=dtype, progress=progress)
        storage.write_text(tmp / MANIFEST, json.dumps({"spec": spec, "images": images}, indent=2, sort_keys=True) + "\n")
    digest = complete_set(folder, spec)
    if digest is None:
        raise RuntimeError(f"the class images written to {folder} do not read back whole; check the disk")
    return ClassImageSet(folder, spec, digest, generated=True)


def _generate(base_path: str | Path, spec: dict, out: Path, *, device: torch.device, dtype: torch.dtype,
              progress: bool) -> dict[str, str]:
    """Sample the set's images into ``out``; returns {name: sha256}. Draws nothing from the
    global random generators (each image's noise has its own seed)."""
    from palp.models.denoising import build_pipeline, generate, initial_latents, sample_seed, write_png

    pipe = build_pipeline(base_path, scheduler=spec["scheduler"], device=device, dtype=dtype)
    size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if size != spec["resolution"]:
        raise RuntimeError(f"the base model at {base_path} makes {size}px images, not the {spec['resolution']}px the set is for")
    latent_shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    prompt, count = spec["prompt"], spec["count"]
    digests = {}
    bar = tqdm(total=count, desc=f"palp train: class images ({prompt})", unit="img", disable=not progress)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for start in range(0, count, BATCH):
                index = list(range(start, min(count, start + BATCH)))
                latents = initial_latents([sample_seed(spec["seed"], prompt, i) for i in index], latent_shape)
                pixels = generate(pipe, [prompt] * len(index), latents, steps=spec["steps"], guidance=spec["guidance"])
                for i, im in zip(index, pixels):
                    write_png(str(out / image_name(i)), im)
                    digests[image_name(i)] = storage.file_digest(out / image_name(i))
                bar.update(len(index))
    finally:
        bar.close()
        del pipe
        from palp.core.memory import release_memory

        release_memory(device)
    return digests


def load_class_pixels(image_set: ClassImageSet) -> torch.Tensor:
    """(count, 3, R, R) pixels in [-1, 1] of a complete set, read from its files."""
    from palp.core.subject_images import read_image, to_tensor

    return torch.stack([to_tensor(read_image(str(p))) for p in image_set.files()])
