"""The benchmarks run end to end in --smoke mode (CPU, tiny model) and report what they promise."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

BENCH = REPO / "evaluation" / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), "--smoke", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _script(name: str):
    """A benchmark script as a module (its main(argv) runs in this process)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_flop_accounting_matches_the_anchor(tmp_path):
    """On shape-only tensors: the UNet forward is the 812.4 GFLOP/image the anchor counted on the
    GPU; with the base frozen a forward+backward is well under the anchors' 3F convention."""
    assert _script("flops").main(["--out", str(tmp_path / "flops.json")]) == 0
    result = json.loads((tmp_path / "flops.json").read_text())
    assert result["unet_fwd_gflop_per_image"] == pytest.approx(812.388507648, rel=1e-6)
    assert 2.0 < result["fwd_bwd_over_fwd"] < 2.5 and 0 < result["lora_share_of_fwd"] < 0.02
    palp = next(r for r in result["steps"] if r["step"].startswith("PALP, beta != 1"))
    assert palp["floor_ms_convention"] == pytest.approx(232, abs=1)  # the anchor's floor at 786 TFLOP/s


def test_train_step_smoke_writes_the_table_and_json(tmp_path):
    out = tmp_path / "train.json"
    proc = _run("train_step.py", "--variants", "naive-db", "palp", "--iters", "1", "--warmup", "0",
                "--run-steps", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "train_step" and result["batch"] == 2 and result["ceiling_tflops"] > 0
    assert result["unet_fwd_gflop_per_image"] > 0 and result["palp_floor_ms_at_ceiling"] > 0
    rows = {r["variant"]: r for r in result["variants"]}
    assert list(rows) == ["naive-db", "palp"]
    for r in rows.values():
        assert {"ms", "first_call_s", "tflops", "share_of_ceiling", "ratio_to_naive_db", "peak_mem_gib", "flops"} <= set(r)
        assert r["ms"] > 0 and r["share_of_ceiling"] > 0  # (a CPU's "ceiling" is only a scale: no upper bound)
    assert rows["naive-db"]["ratio_to_naive_db"] == 1.0
    # A PALP step (beta = 7.5) is 3F + 4F per image, TI+DB 3F.
    assert rows["palp"]["flops"] == pytest.approx(7 / 3 * rows["naive-db"]["flops"])
    (run,) = result["runs"]
    assert run["steps"] == 3 and run["total_s"] > run["setup_s"] > 0 and run["est_total_s_500_steps"] > run["total_s"]
    assert "| palp |" in proc.stdout and "| cold compile cache |" in proc.stdout


def test_train_step_smoke_runs_the_sdxl_shaped_step(tmp_path):
    """--family sdxl (here tiny-sdxl, 128 px): the naive anchor and palp's step both take SDXL's
    added conditions, and the FLOP count is the SDXL UNet's (a PALP step 7/3 of a TI+DB one)."""
    out = tmp_path / "train.json"
    proc = _run("train_step.py", "--family", "sdxl", "--variants", "naive-db", "palp", "--iters", "1", "--warmup", "0",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["model"] == "tiny-sdxl" and result["resolution"] == 128
    rows = {r["variant"]: r for r in result["variants"]}
    assert rows["naive-db"]["flops"] == pytest.approx(3 * result["unet_fwd_gflop_per_image"] * 1e9 * result["batch"])
    assert rows["palp"]["flops"] == pytest.approx(7 / 3 * rows["naive-db"]["flops"]) and rows["palp"]["ms"] > 0


def test_sampling_smoke_matches_the_stock_pipeline(tmp_path):
    out = tmp_path / "sampling.json"
    proc = _run("sampling.py", "--variants", "stock", "palp", "palp+vae=bf16", "--iters", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "sampling" and result["lora"] and result["steps"] == 4 and result["floor_images_per_s"] > 0
    rows = {r["variant"]: r for r in result["variants"]}
    assert list(rows) == ["stock", "palp", "palp+vae=bf16"]
    for r in rows.values():
        assert {"images_per_s", "x_stock", "share_of_ceiling", "first_call_s", "peak_mem_gib", "max_diff_vs_stock"} <= set(r)
        assert r["images_per_s"] > 0
    assert rows["palp"]["max_diff_vs_stock"] == 0  # fp32: palp's sampler is the stock pipeline, step for step
    assert 0 < rows["palp+vae=bf16"]["max_diff_vs_stock"] <= 16 and rows["palp+vae=bf16"]["mean_diff_vs_stock"] < 2


@pytest.mark.parametrize("script, args, message", [
    ("train_step", ["--variants", "palp+turbo"], "option 'turbo' is not one of"),
    ("sampling", ["--variants", "stock+compile=blocks"], "the stock pipeline takes no options"),
    ("train_step", ["--run-steps", "2"], "need at least 3 steps"),
    ("sampling", ["--variants", "palp+vae=fp8"], "vae must be one of"),
])
def test_bad_settings_are_refused_before_anything_runs(script, args, message):
    module = _script(script)
    with pytest.raises(module.BenchError, match=message):
        module.main(["--smoke", *args])


def test_a_bad_setting_is_one_clear_error_on_the_command_line():
    proc = _run("train_step.py", "--variants", "palp+turbo")
    assert proc.returncode == 2 and "option 'turbo' is not one of" in proc.stderr and "Traceback" not in proc.stderr


def _tiny_pipe(scheduler: str, dtype: torch.dtype):
    from palp.models.tiny import tiny_model_dir
    from palp.models.denoising import build_pipeline

    return build_pipeline(tiny_model_dir(), scheduler=scheduler, device=torch.device("cpu"), dtype=dtype)


def test_palp_sampler_equals_the_stock_pipeline_in_bf16_with_dpm(tiny_dir):
    """The same denoising steps as StableDiffusionPipeline.__call__: the same images, also in bf16
    and with a multistep scheduler (the smoke run above checks DDIM in fp32)."""
    from palp.models.denoising import generate, initial_latents

    dtype = torch.bfloat16
    pipe = _tiny_pipe("dpm++", dtype)
    latents = initial_latents([11, 12, 13], (4, 8, 8)).to(dtype)
    prompts = ["A sketch of a cat in Paris at night", "A sketch of a cat in Paris at night", "a dog on a rock"]
    stock = pipe(prompts, num_inference_steps=6, guidance_scale=7.5, latents=latents, output_type="np").images
    ours = generate(pipe, prompts, latents, steps=6, guidance=7.5)
    assert ours.dtype == np.uint8 and ours.shape == (3, 64, 64, 3)
    assert np.array_equal(ours, (stock * 255).round().astype(np.uint8))
    assert not np.array_equal(ours[0], ours[2])
