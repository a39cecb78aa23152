"""Make world v2 the shipped toy world: its exported weights become ``palp/toyworld/weights``
and the example photos are rendered again in v2.

    python evaluation/toyworld/ship_v2.py --export DIR [--held-out 8] [--weights W] [--examples E]

``DIR`` is ``pretrain.py export --world v2``'s folder (sd/, clip/, judge/, recipe.json,
names.json). Before anything is written it is checked: its recipe names world v2 and a
finished unet stage, palp loads its model, and its judge loads. Both folders below are then
made whole beside their destinations and swapped in by renames at the end
(``palp.core.storage.atomic_directory``: each old folder deleted once its new one is in
place), so a failure before that leaves both as they were:

- ``W`` (default ``palp/toyworld/weights``): the export's folders and files;
- ``E`` (default ``examples/toyworld``): the six personal subjects (the development set) and
  ``--held-out`` subjects drawn from the composites pretraining never showed
  (``palp.toyworld.v2.world.held_out_subjects``), four photos each with their truth files;
  ``single-shot/{purple-cat,orange-dog}/00.png`` (each subject's first photo) and
  ``art/watercolour-robot/00.png`` (the pink robot as a watercolour in the snow at night);
  nothing else (v1's photos go).

The tests and numbers that pin the v1 world are then re-measured by hand (see
evaluation/toyworld/README.md, "World v2").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ART_SEED = 11  # the artwork's pose and background


class ShipError(ValueError):
    pass


def check_export(export: Path) -> dict:
    """The export's recipe, after checking that it is a finished v2 export palp can load."""
    from palp.models.base_model import load_base_model
    from palp.toyworld.judge import load_judge
    from palp.toyworld.worlds import world_of

    missing = [p for p in ("sd", "clip/open_clip_config.json", "clip/open_clip_model.safetensors", "judge/judge.safetensors",
                           "recipe.json", "names.json") if not (export / p).exists()]
    if missing:
        raise ShipError(f"{export} is not a v2 export: it lacks {', '.join(missing)} (run pretrain.py export --world v2)")
    if world_of(export) != "v2":
        raise ShipError(f"{export}/recipe.json names world {world_of(export)}, not v2")
    recipe = json.loads((export / "recipe.json").read_text())
    unet = recipe.get("stages", {}).get("unet", {})
    if not isinstance(unet, dict) or not isinstance(unet.get("settings", {}), dict):
        raise ShipError(f"{export}/recipe.json: stages.unet is not a pretraining record")
    if "steps" not in unet or unet.get("steps") != unet.get("settings", {}).get("unet_steps"):
        raise ShipError(f"{export}/recipe.json: the unet stage has not finished ({unet.get('steps', 0)} of "
                        f"{unet.get('settings', {}).get('unet_steps', '?')} steps)")
    load_base_model(str(export / "sd"))
    if load_judge(export / "judge" / "judge.safetensors").world != "v2":
        raise ShipError(f"{export}/judge does not load as world v2's judge")
    return recipe


def stage_weights(export: Path, tmp: Path) -> None:
    for name in ("sd", "clip", "judge"):
        shutil.copytree(export / name, tmp / name)
    for name in ("recipe.json", "names.json"):
        shutil.copy2(export / name, tmp / name)


def stage_examples(examples: Path, held_out: int) -> list[str]:
    """The v2 photos written into ``examples``; returns the subjects' names."""
    from PIL import Image

    from palp.core.storage import atomic_directory
    from palp.toyworld.scene import Scene
    from palp.toyworld.v2.render import render_array
    from palp.toyworld.v2.world import held_out_subjects, write_subjects
    from palp.toyworld.world import PERSONAL_SUBJECTS

    subjects = (*PERSONAL_SUBJECTS, *held_out_subjects(held_out))
    write_subjects(examples, 4, subjects)
    for name in ("purple-cat", "orange-dog"):
        with atomic_directory(examples / "single-shot" / name, replace=True) as tmp:
            shutil.copy2(examples / name / "00.png", tmp / "00.png")
    robot = next(s for s in PERSONAL_SUBJECTS if s.name == "pink-robot")
    with atomic_directory(examples / "art" / "watercolour-robot", replace=True) as tmp:
        Image.fromarray(render_array(Scene(robot.identity, "watercolour", "snow", "night", seed=ART_SEED))).save(tmp / "00.png")
    return [s.name for s in subjects]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", required=True, type=Path, help="pretrain.py export --world v2's folder")
    ap.add_argument("--held-out", type=int, default=8, help="held-out subjects beside the six development ones")
    ap.add_argument("--weights", type=Path, default=REPO / "palp" / "toyworld" / "weights")
    ap.add_argument("--examples", type=Path, default=REPO / "examples" / "toyworld")
    args = ap.parse_args(argv)
    from safetensors import SafetensorError

    from palp.toyworld.v2.world import held_out_subjects

    pool = len(held_out_subjects(10**6))
    if not 0 <= args.held_out <= pool:
        ap.error(f"--held-out must be between 0 and {pool} (the held-out composites that are not the development subjects)")
    try:
        recipe = check_export(args.export)
    except (ShipError, OSError, ValueError, RuntimeError, SafetensorError) as e:  # damaged or foreign weights too
        print(f"ship_v2: {e}", file=sys.stderr)
        return 2
    from palp.core.storage import atomic_directory

    # Both folders are made whole first; each is swapped in only when the block ends without error.
    with atomic_directory(args.weights, replace=True) as weights, atomic_directory(args.examples, replace=True) as examples:
        stage_weights(args.export, weights)
        names = stage_examples(examples, args.held_out)
    print(f"shipped world v2 (unet {recipe['stages']['unet']['steps']} steps) to {args.weights}; "
          f"photos of {len(names)} subjects in {args.examples}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
