"""The alignment term pulls the right way: on the toy world, a short PALP run with a large lambda
moves the judge's reading of plain "A photo of [V]" samples toward the target prompt's style and
place, against TI+DB trained from the same seed on the same photos (photo style, plain
background). TI+DB has no reason to draw a sketch in the snow when asked for a photo; if PALP's
samples do not lean that way more often, the term's sign, its prompt or its weight is wrong."""

from pathlib import Path

from palp.cli import main

REPO = Path(__file__).resolve().parents[1]
TARGET = "A sketch of [V] in the snow at night"
STEPS, LR, LAM, SAMPLES = 30, 3e-3, 3.0, 8  # 16 of 16 vs 0 of 16 at 20, 30, 50 and 100 steps


def _photos_of_v(tmp_path: Path, method: str, *extra: str) -> list[dict]:
    from palp.core.subject_images import read_image
    from palp.toyworld.judge import load_judge, predict

    out = tmp_path / method
    assert main(["train", "--prepared", str(tmp_path / "prep"), "--pretrained-model", "toyworld", "--method", method,
                 *extra, "--steps", str(STEPS), "--batch-size", "2", "--lr", str(LR), "--lora-rank", "8",
                 "--save-steps", str(STEPS), "--seed", "0", "--output", str(out), "--quiet"]) == 0
    assert main(["sample", "--model", str(out), "--prompts", "A photo of [V]", "--output", str(tmp_path / f"samples-{method}"),
                 "--num-samples", str(SAMPLES), "--steps", "15", "--seed", "0", "--quiet"]) == 0
    images = [read_image(str(p)).convert("RGB") for p in sorted((tmp_path / f"samples-{method}").rglob("*.png"))]
    assert len(images) == SAMPLES
    return predict(load_judge(), images)


def test_palp_pulls_photos_of_v_toward_the_target_style_and_place(tmp_path):
    subject = REPO / "examples/toyworld/purple-cat"
    assert main(["prepare", "--subject", f"purple-cat={subject}", "--class-word", "purple-cat=cat", "--prompt", TARGET,
                 "--pretrained-model", "toyworld", "--clip", "toyworld", "--output", str(tmp_path / "prep"), "--quiet"]) == 0
    tidb = _photos_of_v(tmp_path, "ti-db")
    palp = _photos_of_v(tmp_path, "palp", "--lambda", str(LAM))

    def toward(readings):  # how many of the target's style and place the samples show
        return sum(r["style"] == "sketch" for r in readings) + sum(r["place"] == "snow" for r in readings)

    seen = {"ti-db": [(r["style"], r["place"]) for r in tidb], "palp": [(r["style"], r["place"]) for r in palp]}
    print(f"toward the target: palp {toward(palp)}, ti-db {toward(tidb)} of {2 * SAMPLES}")
    assert toward(palp) > toward(tidb), seen
    assert sum(r["class"] == "cat" for r in palp) >= SAMPLES // 2, seen  # still a cat, not a collapse
