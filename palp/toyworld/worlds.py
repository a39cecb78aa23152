"""Which toy world a set of toy-world weights was trained in, and that world's renderer.

A toy-world weights folder (``palp/toyworld/weights``, or any export of
``evaluation/toyworld/pretrain.py``) holds ``sd/``, ``clip/``, ``judge/`` and ``recipe.json``;
the recipe's ``stages.data.world`` names the world its data was rendered in (``v1`` when the
recipe predates world v2 and names none). Everything that draws scenes for a judge (its
accuracy, a unit's ceiling) draws them in the judge's own world and passes them through the VAE
beside it, so a judge is never measured on another world's pictures.
"""

from __future__ import annotations

import json
from pathlib import Path

WORLDS = ("v1", "v2")


def world_of(root: str | Path) -> str:
    """The world of the weights folder ``root`` (its ``recipe.json``; ``v1`` without one).
    ValueError naming the file if the recipe names a world palp does not know."""
    recipe = Path(root) / "recipe.json"
    if not recipe.is_file():
        return "v1"
    try:
        world = json.loads(recipe.read_text()).get("stages", {}).get("data", {}).get("world", "v1")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{recipe} is not a pretraining recipe (a JSON object with stages.data): {e}") from e
    if world not in WORLDS:
        raise ValueError(f"{recipe} names world {str(world)[:40]!r}; palp knows {', '.join(WORLDS)}")
    return world


WORLD_KEY = "palp_toyworld_world"  # a judge.safetensors' metadata entry naming its world (v2's export writes it)


def weights_root_of(judge_file: str | Path) -> Path | None:
    """The weights folder a judge file belongs to, in the export's layout only:
    ``ROOT/judge/judge.safetensors`` beside ``ROOT/recipe.json`` and ``ROOT/sd``. None for a judge
    anywhere else (a recipe.json that merely lies above it is not its own)."""
    path = Path(judge_file).resolve()
    root = path.parent.parent
    if path.parent.name == "judge" and (root / "recipe.json").is_file() and (root / "sd").is_dir():
        return root
    return None


def world_of_judge_file(judge_file: str | Path, root: Path | None) -> str:
    """The world of a judge file: its own metadata's (:data:`WORLD_KEY`), else its weights
    folder's recipe (:func:`world_of`), else v1. ValueError when the two disagree or name a
    world palp does not know."""
    from safetensors import safe_open

    with safe_open(str(judge_file), framework="pt") as f:
        own = (f.metadata() or {}).get(WORLD_KEY)
    if own is not None and own not in WORLDS:
        raise ValueError(f"{judge_file} names world {own[:40]!r} in its metadata; palp knows {', '.join(WORLDS)}")
    folder = world_of(root) if root is not None else None
    if own is not None and folder is not None and own != folder:
        raise ValueError(f"{judge_file} is a world-{own} judge but its weights folder's recipe.json names {folder}")
    return own or folder or "v1"


def renderer(world: str):
    """``world``'s scene renderer: a :class:`palp.toyworld.scene.Scene` -> (64, 64, 3) uint8."""
    if world == "v1":
        from palp.toyworld.render import render_array
    elif world == "v2":
        from palp.toyworld.v2.render import render_array
    else:
        raise ValueError(f"unknown toy world {world!r}; palp knows {', '.join(WORLDS)}")
    return render_array


def judge_world(judge) -> str:
    """The world a loaded judge was trained in (:func:`palp.toyworld.judge.load_judge` records
    it; ``v1`` for a judge built in code)."""
    return getattr(judge, "world", "v1")
