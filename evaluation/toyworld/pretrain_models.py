"""The toy world's architectures, as ``pretrain.py`` builds them before training.

A small Stable Diffusion (VAE, UNet, CLIP text encoder with the real CLIP tokenizer) and a
small open_clip model. The shipped weights were trained from exactly these; palp loads them
through ``from_pretrained`` and never imports this module.
"""

from __future__ import annotations

from pathlib import Path

from palp.models.clip import TINY_CLIP_CONFIG

RES = 64
LATENT = 16
LATENT_CHANNELS = 8


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(24, 48, 64),
        layers_per_block=1,
        # 8 latent channels: 16x16x8 keeps the identity patterns that 16x16x4 blurs away.
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=RES,
    )


def build_text_encoder():
    from palp.models.tiny import clip_text_encoder

    return clip_text_encoder(hidden=64, intermediate=256, layers=4, heads=4)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(48, 96, 120),  # 4.8M parameters: the weights file stays under 20 MB
        layers_per_block=1,
        # Cross-attention at 8x8 and 4x4: style, place and time are global properties.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_tokenizer():
    import tempfile

    from transformers import CLIPTokenizer

    from palp.models.tiny import write_clip_tokenizer_files

    with tempfile.TemporaryDirectory() as d:
        write_clip_tokenizer_files(Path(d))
        return CLIPTokenizer.from_pretrained(d, pad_token="<|endoftext|>", model_max_length=77)


CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
    },
    "preprocess_cfg": TINY_CLIP_CONFIG["preprocess_cfg"],  # CLIP's own normalisation
}
