"""Tiny, seeded models shaped like Stable Diffusion 1.x, 2.x and XL, written in the real diffusers layout.

Nothing can be downloaded on a build machine, so tests, CI and the local demo run on these
models. ``tiny`` has every part of Stable Diffusion 1.x at toy width: a UNet2DConditionModel
with cross-attention, an AutoencoderKL with SD's 8x down-sampling and 4 latent channels, a
CLIPTextModel, the real 49,408-token CLIP BPE tokenizer (built offline from the vocabulary
open_clip ships) and SD's noise schedule. ``tiny-sd2`` (epsilon, 64x64, like SD 2.x-base) and
``tiny-sd2-v`` (v-prediction, 96x96, like SD 2.x's 768x768 models) have SD 2.x's differences:
an OpenCLIP-style text encoder (``gelu``, padded with ``!``), per-block attention head counts,
linear projections in the transformer blocks, and a DDIM/PNDM scheduler config that names its
``prediction_type``. ``tiny-sdxl`` (128x128) is shaped like SDXL (build_tiny_sdxl_pipeline). Each is saved with ``save_pretrained`` and loaded with ``from_pretrained``,
the same path as a real checkpoint.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from palp.core.cache import cache_root

TINY_NAME = "tiny"
TINY_SD2_NAME = "tiny-sd2"
TINY_SD2_V_NAME = "tiny-sd2-v"
TINY_SDXL_NAME = "tiny-sdxl"
# Bump when the architecture or seed below changes: cached copies are keyed by it.
TINY_VERSION = "2"  # 2: the tokenizer config no longer records HF_HUB_OFFLINE (local_files_only)
TINY_RESOLUTION = 64
TINY_SEED = 0

# Stable Diffusion's noise schedule, which 1.x and 2.x share.
_SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    steps_offset=1,
    trained_betas=None,
)
# SD-1.x's scheduler config (CompVis/stable-diffusion-v1-4/scheduler/scheduler_config.json).
SD_SCHEDULER_CONFIG = dict(_SD_SCHEDULE, skip_prk_steps=True)



def write_clip_tokenizer_files(out_dir: Path) -> None:
    """Write vocab.json + merges.txt of CLIP's BPE (SD-1.x's tokenizer) from open_clip's data.

    CLIP's vocabulary is 256 byte symbols, the same with the end-of-word mark, one token per
    BPE merge (the first 48,894 merges), then <|startoftext|> and <|endoftext|>: 49,408.
    """
    from palp.core import clip_bpe

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(clip_bpe.vocabulary())}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in clip_bpe.merges()))


def clip_text_encoder(*, hidden: int, intermediate: int, layers: int, heads: int, hidden_act: str = "quick_gelu",
                      token_ids: tuple[int, int, int] = (49406, 49407, 49407)):
    """A CLIPTextModel of the given width over CLIP's 49,408-token vocabulary (SD-1.x's layout;
    SD 2.x's OpenCLIP encoder: ``hidden_act="gelu"``). ``token_ids``: (bos, eos, pad) as its config records them."""
    from transformers import CLIPTextConfig, CLIPTextModel

    bos, eos, pad = token_ids

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            projection_dim=hidden,
            hidden_act=hidden_act,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    )


def _tiny_vae(resolution: int):
    """The tiny models' VAE (weights from the current torch seed): 3 down-samplings, SD's factor 8."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )


def _tiny_unet(resolution: int, **shape):
    """A tiny UNet2DConditionModel with weights from the current seed: two levels of 32 and 64
    channels, one layer each, cross-attention on the first level unless ``shape`` says otherwise."""
    from diffusers import UNet2DConditionModel

    config = dict(sample_size=resolution // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  norm_num_groups=8)
    return UNet2DConditionModel(**{**config, **shape})


def build_tiny_pipeline(seed: int = TINY_SEED):
    """The tiny StableDiffusionPipeline, with weights drawn from ``seed``."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(TINY_RESOLUTION, cross_attention_dim=32, attention_head_dim=8)  # latents (B, 4, 8, 8)
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(TINY_RESOLUTION)
        torch.manual_seed(seed + 2)
        text_encoder = clip_text_encoder(hidden=32, intermediate=37, layers=2, heads=4)
    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer_files(Path(tok_dir))
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, pad_token="<|endoftext|>", model_max_length=77)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# SD 2.x's schedule: SD-1.x's betas, DDIM's config as stabilityai's 2.x checkpoints ship it.
SD2_SCHEDULER_CONFIG = dict(_SD_SCHEDULE, clip_sample=False)
TINY_SD2_VERSION = "1"


def build_tiny_sd2_pipeline(seed: int = TINY_SEED, *, prediction_type: str = "v_prediction"):
    """A tiny SD-2.x-shaped StableDiffusionPipeline, weights drawn from ``seed``: 96x96 images
    (12x12 latents) for ``v_prediction`` as SD 2.x's 768 model has 1.5x SD-1.x's side, 64x64 for
    ``epsilon`` as SD 2.x-base.

    What makes it SD 2.x: the text encoder is OpenCLIP's as diffusers converts it (``gelu``;
    the real one keeps the penultimate of OpenCLIP's 24 layers, so its last hidden state is the
    penultimate layer's; bos/eos/pad ids as its config records them, its tokenizer pads with
    ``!``), the UNet's ``attention_head_dim`` is a per-block list of head counts, its
    transformer blocks project with linear layers (``use_linear_projection``), the
    v-prediction model upcasts attention to fp32 (``upcast_attention``, as SD 2.1's 768 model),
    and the scheduler config names its ``prediction_type``."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    v = prediction_type == "v_prediction"
    resolution = 96 if v else 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 10)
        unet = _tiny_unet(resolution, cross_attention_dim=32, attention_head_dim=(4, 8), use_linear_projection=True,
                          upcast_attention=v)
        torch.manual_seed(seed + 11)
        vae = _tiny_vae(resolution)
        torch.manual_seed(seed + 12)
        text_encoder = clip_text_encoder(hidden=32, intermediate=37, layers=2, heads=4, hidden_act="gelu",
                                         token_ids=(0, 2, 1))
    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer_files(Path(tok_dir))
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, pad_token="!", model_max_length=77)
    scheduler = (DDIMScheduler(**SD2_SCHEDULER_CONFIG, prediction_type="v_prediction") if v else
                 PNDMScheduler(**SD_SCHEDULER_CONFIG, prediction_type="epsilon"))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# SDXL's two text encoders, read as SDXL reads them: the penultimate hidden states of each,
# concatenated (32 + 32 = the UNet's cross-attention width), and the second's projected pooled
# output (32) with the six micro-conditioning numbers, each embedded in 8 channels: 6 x 8 + 32 = 80.
TINY_SDXL_VERSION = "1"
TINY_SDXL_RESOLUTION = 128  # twice the tiny SD-1.x side, as SDXL's 1024 is twice SD-1.x's 512
# SDXL base 1.0's scheduler config, every key as it ships (Euler, "leading" spacing, and the DDIM
# keys clip_sample and set_alpha_to_one that DDIM reads when palp samples with it).
SDXL_SCHEDULER_CONFIG = dict(_SD_SCHEDULE, clip_sample=False, interpolation_type="linear", prediction_type="epsilon",
                             sample_max_value=1.0, skip_prk_steps=True, timestep_spacing="leading", use_karras_sigmas=False)


def build_tiny_sdxl_pipeline(seed: int = TINY_SEED):
    """A tiny StableDiffusionXLPipeline, weights drawn from ``seed``: 128x128 images (16x16 latents).

    What makes it SDXL: two text encoders, a CLIPTextModel (``quick_gelu``, like CLIP ViT-L) and
    a CLIPTextModelWithProjection (``gelu``, like OpenCLIP bigG, with a pooled projection), both
    with the legacy token ids of SDXL's configs (bos 0, eos 2, pad 1) and the real CLIP BPE
    tokenizer, the second padding with ``!``; a UNet with ``addition_embed_type: text_time``
    (pooled text embedding + time ids), per-block head counts, several transformer layers in its
    inner block and linear projections; SDXL's VAE scaling factor 0.13025; Euler's scheduler
    config, and ``force_zeros_for_empty_prompt`` (the empty prompt's states are zeros)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 20)
        unet = _tiny_unet(TINY_SDXL_RESOLUTION, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                          transformer_layers_per_block=(1, 2), use_linear_projection=True,
                          addition_embed_type="text_time", addition_time_embed_dim=8,
                          projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64)
        torch.manual_seed(seed + 21)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=TINY_SDXL_RESOLUTION, scaling_factor=0.13025,
        )
        torch.manual_seed(seed + 22)
        text_encoder = clip_text_encoder(hidden=32, intermediate=37, layers=2, heads=4, token_ids=(0, 2, 1))
        torch.manual_seed(seed + 23)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=32, hidden_act="gelu", bos_token_id=0, eos_token_id=2,
            pad_token_id=1))
    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer_files(Path(tok_dir))
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, pad_token="<|endoftext|>", model_max_length=77)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir, pad_token="!", model_max_length=77)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


# name -> (cache folder, builder)
TINY_MODELS = {
    TINY_NAME: (f"tiny-sd-v{TINY_VERSION}", build_tiny_pipeline),
    TINY_SD2_NAME: (f"tiny-sd2-v{TINY_SD2_VERSION}", lambda seed: build_tiny_sd2_pipeline(seed, prediction_type="epsilon")),
    TINY_SD2_V_NAME: (f"tiny-sd2-vpred-v{TINY_SD2_VERSION}",
                      lambda seed: build_tiny_sd2_pipeline(seed, prediction_type="v_prediction")),
    TINY_SDXL_NAME: (f"tiny-sdxl-v{TINY_SDXL_VERSION}", build_tiny_sdxl_pipeline),
}


# What a complete tiny model folder holds (save_pretrained's layout).
TINY_FILES = ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
              "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json", "tokenizer/tokenizer.json",
              "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
              "vae/config.json", "vae/diffusion_pytorch_model.safetensors")
# SDXL's second text encoder and tokenizer, beside those.
TINY_SDXL_FILES = ("text_encoder_2/config.json", "text_encoder_2/model.safetensors", "tokenizer_2/tokenizer_config.json",
                   "tokenizer_2/tokenizer.json")


def save_tiny_model(out_dir: str | Path, seed: int = TINY_SEED, *, replace: bool = False, name: str = TINY_NAME) -> Path:
    """Build the tiny model ``name`` (one of TINY_MODELS) and write it atomically to ``out_dir``
    in the diffusers layout (``replace``: over an incomplete folder there)."""
    import json

    from palp.core.storage import atomic_directory

    with atomic_directory(out_dir, replace=replace) as tmp:
        TINY_MODELS[name][1](seed).save_pretrained(tmp, safe_serialization=True)
        # transformers records how the tokenizer was loaded (local_files_only follows
        # HF_HUB_OFFLINE): that would make the model's files, and so its pin, depend on the
        # environment it was built in, and a run trained offline be refused when sampled online.
        for folder in ("tokenizer", "tokenizer_2"):
            config = tmp / folder / "tokenizer_config.json"
            if config.is_file():
                settings = json.loads(config.read_text())
                settings.pop("local_files_only", None)
                config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def tiny_model_dir(name: str = TINY_NAME) -> Path:
    """The cached tiny model ``name`` (one of TINY_MODELS), built on first use, and again if the folder is incomplete.

    In a multi-process run (torch.distributed initialized) rank 0 builds it while the others
    wait: transformers writes a model's weights from rank 0 only, so a folder built by another
    rank would lack the text encoder's."""
    import torch.distributed as dist

    if name not in TINY_MODELS:
        raise ValueError(f"no tiny model {name!r}; there are {', '.join(TINY_MODELS)}")
    path = cache_root() / "models" / TINY_MODELS[name][0]
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        files = TINY_FILES + (TINY_SDXL_FILES if name == TINY_SDXL_NAME else ())
        if not all((path / f).is_file() for f in files):
            save_tiny_model(path, replace=path.exists(), name=name)
    if distributed:
        dist.barrier()
    return path
