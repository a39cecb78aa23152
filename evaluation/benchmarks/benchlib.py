"""What the two benchmarks share: the SD-1.4-shaped model, timing, FLOPs, the ceiling, output.

The shapes are those of the reference GPU anchors (a plain diffusers-style step and sampler
measured on one H200, RESULTS.md), so the numbers here and the anchors' are comparable. Weights are random (speed does not depend on
them) unless a real model folder is given.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # palp itself, when run from a checkout without installing it

from palp.core import storage  # noqa: E402

SD14_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32,
    out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD14_VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3,
                sample_size=512, up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215)
SD14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
# SDXL base 1.0's shapes (stabilityai/stable-diffusion-xl-base-1.0's configs): a 3-level UNet with
# 1, 2 and 10 transformer layers per block, 2048-wide text states (CLIP ViT-L 768 + OpenCLIP bigG
# 1280, penultimate layers), the pooled bigG projection (1280) and six time ids of 256 channels each.
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
SDXL_VAE = dict(SD14_VAE, sample_size=1024, scaling_factor=0.13025)
SDXL_TEXT = dict(SD14_TEXT, bos_token_id=0, eos_token_id=2, pad_token_id=1)
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                   max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280,
                   bos_token_id=0, eos_token_id=2, pad_token_id=1)
EXAMPLE_SUBJECT = REPO / "examples" / "subjects" / "cat"


class BenchError(ValueError):
    """A setting the benchmark cannot run with."""


def quiet_libraries() -> None:
    """No per-file progress bars or dtype advice from diffusers/transformers in the benchmark's output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def random_sd14_dir(out: Path, *, seed: int = 0, tokenizer: str | None = None) -> Path:
    """An SD-1.4-shaped model with random weights, in the diffusers layout (made once, then reused).

    The tokenizer is CLIP's BPE, from ``tokenizer`` (a folder with vocab.json + merges.txt) or
    built from open_clip's vocabulary file."""
    if (out / "model_index.json").exists():
        return out
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from palp.core.storage import atomic_directory
    from palp.models.tiny import SD_SCHEDULER_CONFIG, write_clip_tokenizer_files

    log(f"building a random SD-1.4-shaped model in {out} ...")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD14_UNET)
        vae = AutoencoderKL(**SD14_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD14_TEXT))
    with atomic_directory(out) as tmp:
        tok_dir = Path(tokenizer) if tokenizer else tmp / "_tok"
        if not tokenizer:
            write_clip_tokenizer_files(tok_dir)
        tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token="<|endoftext|>",
                            model_max_length=77)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                       scheduler=PNDMScheduler(**SD_SCHEDULER_CONFIG), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def random_sdxl_dir(out: Path, *, seed: int = 0, tokenizer: str | None = None) -> Path:
    """An SDXL-base-shaped model with random weights (1024 px), in the diffusers layout (made once, then reused)."""
    if (out / "model_index.json").exists():
        return out
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from palp.core.storage import atomic_directory
    from palp.models.tiny import SDXL_SCHEDULER_CONFIG, write_clip_tokenizer_files

    log(f"building a random SDXL-shaped model in {out} ...")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2))
    with atomic_directory(out) as tmp:
        tok_dir = Path(tokenizer) if tokenizer else tmp / "_tok"
        if not tokenizer:
            write_clip_tokenizer_files(tok_dir)
        toks = [CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token=pad, model_max_length=77)
                for pad in ("<|endoftext|>", "!")]
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=toks[0],
                                         tokenizer_2=toks[1], unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
                                         add_watermarker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def model_dir(args) -> Path:
    """--model, the tiny model of --family (--smoke), or the random SD-1.4- or SDXL-shaped one."""
    from palp.models.base_model import resolve_model_dir

    if args.model:
        return resolve_model_dir(args.model)
    xl = getattr(args, "family", "sd") == "sdxl"
    if args.smoke:
        return resolve_model_dir("tiny-sdxl" if xl else "tiny")
    if xl:
        return random_sdxl_dir(Path(args.random_model_dir + "-sdxl"), tokenizer=args.tokenizer)
    return random_sd14_dir(Path(args.random_model_dir), tokenizer=args.tokenizer)


def model_label(args) -> str:
    xl = getattr(args, "family", "sd") == "sdxl"
    return str(args.model or (("tiny-sdxl" if xl else "tiny") if args.smoke else
                              ("random SDXL-shaped" if xl else "random SD-1.4-shaped")))


def add_common_args(ap) -> None:
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, few iterations: checks that everything runs")
    ap.add_argument("--model", help="a real model folder (diffusers layout) instead of random SD-1.4-shaped weights")
    ap.add_argument("--family", choices=("sd", "sdxl"), default="sd",
                    help="the random model's shape: SD-1.4 at 512 px, or SDXL base at 1024 px (--smoke: tiny or tiny-sdxl)")
    ap.add_argument("--random-model-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "palp-sd14-random"),
                    help="where the random SD-1.4-shaped model is written once and reused")
    ap.add_argument("--tokenizer", help="folder with CLIP's vocab.json + merges.txt (default: built from open_clip)")
    ap.add_argument("--device", help="default: cuda (cpu with --smoke)")
    ap.add_argument("--iters", type=int, help="timed iterations per variant")
    ap.add_argument("--warmup", type=int, help="untimed iterations per variant, after the first call")
    ap.add_argument("--ceiling-tflops", type=float, help="the device's matmul ceiling (default: measured here)")
    ap.add_argument("--compile-backend", help="torch.compile backend (default: inductor; aot_eager with --smoke)")
    ap.add_argument("--out", help="JSON file for the results (written atomically)")


def device_of(args) -> torch.device:
    quiet_libraries()
    dev = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("no CUDA device here; run with --smoke (CPU, tiny model) or --device cpu")
    return dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, iters: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls: CUDA events on a GPU, wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def first_call_s(fn, device: torch.device) -> float:
    """Seconds of the first call (compilation, autotuning, allocator warm-up), to completion."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def matmul_ceiling_tflops(device: torch.device) -> float:
    """The device's dense matmul rate, measured as the anchors do: bf16 8192^3 on a GPU (fp32
    1024^3 on a CPU, where it only gives the smoke run's percentages a scale)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, iters=10, warmup=3)
    return 2 * n**3 / (ms / 1e3) / 1e12


def unet_forward_flops(unet, *, resolution: int, device: torch.device, dtype: torch.dtype, text_dim: int) -> float:
    """FLOPs of one UNet forward on one image (torch's FLOP counter: matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    h = resolution // 8
    x = torch.randn(1, unet.config.in_channels, h, h, device=device, dtype=dtype)
    states = torch.randn(1, 77, text_dim, device=device, dtype=dtype)
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: the pooled text embedding and six time ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled, device=device, dtype=dtype),
                 "time_ids": torch.full((1, 6), float(resolution), device=device, dtype=dtype)}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500], device=device), encoder_hidden_states=states, added_cond_kwargs=added)
    return float(counter.get_total_flops())


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak device memory since the last reset (GiB); on a CPU the process's peak RSS, which never resets."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    import diffusers
    import peft

    return {"device": device_name(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format); a missing or None value prints as n/a."""
    def cell(row, key, fmt):
        v = row.get(key)
        return "n/a" if v is None else format(v, fmt)

    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | None, obj: dict) -> None:
    if path:
        storage.write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def parse_variant(spec: str, known_bases: tuple[str, ...], known_options: tuple[str, ...]) -> tuple[str, dict]:
    """``palp+cl+compile=blocks`` -> ("palp", {"cl": True, "compile": "blocks"})."""
    base, *opts = spec.split("+")
    if base not in known_bases:
        raise BenchError(f"variant {spec!r}: {base!r} is not one of {', '.join(known_bases)}")
    options = {}
    for o in opts:
        key, _, value = o.partition("=")
        if key not in known_options:
            raise BenchError(f"variant {spec!r}: option {key!r} is not one of {', '.join(known_options)}")
        options[key] = value or True
    return base, options
