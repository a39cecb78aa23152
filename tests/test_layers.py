"""The layers import one way: palp (the library) <- components <- pipelines. Inside palp, the
subpackages follow the pipeline: core <- models (and the toy world) <- method <- steps, each
step importing no later step, and the command modules (cli, step_image) above them all. No
chain of imports from any palp module reaches kfp, importing the settings loads no torch, and
no two files import each other, directly or round a longer loop (function-level imports
count: they run too)."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

LAYERS = ("palp", "components", "pipelines")


def _modules() -> dict[str, object]:
    """Every module of the three layers, by dotted name -> its file."""
    found = {}
    for layer in LAYERS:
        for path in (REPO / layer).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path, modules: dict) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (``from a import b`` counts as
    a.b where that is a module, else as a)."""
    def known(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {m for a in node.names if (m := known(a.name))}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                m = known(f"{base}.{a.name}")
                out |= {m if m and m != name else known(base)} - {None, name}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle_between_files():
    graph = _graph()
    assert graph["palp.cli"] and graph["pipelines.cli"] >= {"palp.cli"}  # the scan sees imports at all
    assert _cycles(graph) == []
    # The finder finds a loop where there is one.
    assert _cycles({**graph, "palp.core.storage": graph["palp.core.storage"] | {"palp.cli"}}) != []


def test_layers_import_one_way():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = [(a, b) for a, deps in _graph().items() for b in deps if rank[b.split(".")[0]] > rank[a.split(".")[0]]]
    assert upward == []


def test_no_palp_module_reaches_kfp():
    """Import every palp module in one fresh interpreter: kfp is in none of their import chains."""
    names = sorted(n for n in _modules() if n.split(".")[0] == "palp" and not n.endswith("__main__"))
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "bad = sorted(m for m in sys.modules if m == 'kfp' or m.startswith(('kfp.', 'google_cloud_pipeline')))\n"
            "print(len([m for m in sys.modules if m.startswith('palp')]))\n"
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) >= len(names)


def test_the_palp_command_offers_the_pipeline_commands_and_the_library_does_not():
    from palp.cli import build_parser
    from pipelines.cli import add_pipeline_parser

    def commands(parser):
        return set(next(a for a in parser._actions if a.dest == "command").choices)

    assert "pipeline" not in commands(build_parser())
    assert commands(build_parser([add_pipeline_parser])) == commands(build_parser()) | {"pipeline"}
    out = subprocess.run([sys.executable, "-m", "pipelines", "pipeline", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "run-local" in out.stdout


def test_the_project_refers_to_nothing_outside_its_repository():
    """Documentation lives in the repository: no file of the project sends a reader to a path
    beside it (a clone has nothing there)."""
    tracked = subprocess.run(["git", "ls-files", "palp", "components", "pipelines", "evaluation", "docs", "README.md",
                              "tests", "scripts", "images", "examples"], cwd=REPO, capture_output=True, text=True).stdout.split()
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "palp", "components", "pipelines",
                                "evaluation", "docs", "tests"], cwd=REPO, capture_output=True, text=True).stdout.split()
    outside = "shared" + "/"  # spelled apart so this file does not match itself
    needles = ("../" + outside, outside + "PALP.md", outside + "anchors")
    offenders = []
    for name in sorted(set(tracked) | set(untracked)):
        path = REPO / name
        if path.suffix not in (".py", ".md", ".sh", ".yaml", ".txt", ".toml", "") or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        if any(needle in text for needle in needles):
            offenders.append(name)
    assert offenders == [], f"these refer to a path outside the repository: {offenders}"


# palp's floors, lowest first: a module may import its own floor and those below.
PALP_FLOORS = {"core": 0, "models": 1, "toyworld": 1, "method": 2, "steps": 3}
COMMAND_MODULES = ("palp.cli", "palp.__main__", "palp.step_image")
# The steps in the pipeline's order; a step's helper modules share its place.
STEP_ORDER = {"prepare": 0, "train": 1, "checkpoints": 1, "validation": 1, "run_page": 1, "launch": 1, "class_images": 1, "sample": 2, "sample_jobs": 2,
              "score": 3, "score_report": 3, "study": 4, "analyze": 5}


def _palp_rank(module: str) -> tuple[int, int]:
    """(floor, place in the pipeline) of a palp module; the package's face (its version) is core."""
    parts = module.split(".")
    if module in COMMAND_MODULES:
        return (9, 0)
    if module == "palp" or parts[1] == "__init__":
        return (0, 0)
    if parts[1] == "steps" and len(parts) > 2:
        return (PALP_FLOORS["steps"], STEP_ORDER[parts[2]])
    return (PALP_FLOORS[parts[1]], -1 if len(parts) == 2 else 0)


def _upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, deps in graph.items() if a.startswith("palp")
                  for b in deps if b.startswith("palp") and _palp_rank(b) > _palp_rank(a))


def test_every_palp_module_has_a_floor():
    """A new module goes into a subpackage (or is a command): its floor, and a step's place, is known."""
    unknown = []
    for name in _modules():
        if name.split(".")[0] == "palp":
            try:
                _palp_rank(name)
            except (KeyError, IndexError):
                unknown.append(name)
    assert unknown == []


def test_a_step_imports_no_later_step_and_no_command_module():
    """core <- models <- method <- steps, prepare <- train <- sample <- score <- study export <- analyze;
    nothing in the library but the command modules imports a command module."""
    graph = _graph()
    assert graph["palp.steps.score"] >= {"palp.steps.sample_jobs"}  # the scan sees the steps' imports
    assert _upward(graph) == []
    # The rule sees an arrow that runs back up the pipeline, and one up to a command module.
    assert _upward({**graph, "palp.steps.sample": graph["palp.steps.sample"] | {"palp.steps.score"}}) == [
        ("palp.steps.sample", "palp.steps.score")]
    assert _upward({**graph, "palp.core.storage": {"palp.cli"}}) == [("palp.core.storage", "palp.cli")]
    assert _upward({**graph, "palp.models.clip": {"palp.method.guidance"}}) == [("palp.models.clip", "palp.method.guidance")]


def test_importing_the_settings_loads_no_torch():
    """The pipeline module reads the settings' defaults and choices: that costs no torch import."""
    code = ("import sys\nimport palp.core.settings, palp.core.methods\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'peft')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    # The check can fail: a module that imports torch is seen.
    out = subprocess.run([sys.executable, "-c", code.replace("palp.core.methods", "palp.method.guidance")], cwd=REPO,
                         capture_output=True, text=True)
    assert "torch" in out.stdout
