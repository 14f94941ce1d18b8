"""dvc.yaml declares, for every stage, exactly the code and the params its step uses.

The code a step uses is every project module its step module imports, at module level or inside a
function, followed transitively; the params are its typed config's keys (cacara/config.py). A stage
that misses one reruns too rarely (a stale model after a code change); one that lists extra reruns
too often.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from cacara.config import STEP_CONFIGS
from tests.conftest import REPO

PACKAGES = ("cacara", "components", "model")
#: Every `cacara <command>` runs the CLI's module-level code and builds a typed config before the step.
ENTRY_FILE = "cacara/cli.py"
ENTRY_MODULES = ("cacara.config",)
#: dvc stage (foreach stages by their base name) -> (step module, config name in STEP_CONFIGS).
STAGES = {
    "ingest": ("components.ingest", "ingest"),
    "validate": ("components.validate", "validate"),
    "embed_text": ("components.embed_text", "embed_text"),
    "train": ("components.train", "train"),
    "evaluate": ("components.evaluate", "evaluate"),
    "index": ("components.index", "index"),
    "package": ("components.package", "package"),
    "drift_profile": ("components.drift", "profile"),
    "drift": ("components.drift", "drift"),
}
#: Code a stage's output holds besides what its step imports: the Bento carries the service.
PACKAGED = {"package": ("cacara.service",)}


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    names: set[str] = set()
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from model import sead_onnx`
    return names


def code_closure(*modules: str) -> set[str]:
    """Repository-relative paths of the project files the given modules import, transitively."""
    todo, seen = list(modules), set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            continue
        files.add(path)
        # A package's __init__ runs before any of its modules.
        parent = name.rsplit(".", 1)[0] if "." in name else None
        if parent:
            todo.append(parent)
        todo.extend(_imports(path))
    return {str(f.relative_to(REPO)) for f in files if f.name != "__init__.py" or f.stat().st_size}


def stage_code(step_module: str) -> set[str]:
    """What `cacara <command>` runs for a step: the CLI's module-level imports (its command functions
    import only their own step), the config module, and the step module's closure."""
    entry = _imports(REPO / ENTRY_FILE, top_level_only=True)
    return {ENTRY_FILE} | code_closure(step_module, *ENTRY_MODULES, *entry)


@pytest.fixture(scope="module")
def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _code_deps(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if d.endswith(".py")}


@pytest.mark.parametrize("stage_name", sorted(STAGES))
def test_stage_declares_exactly_the_code_its_step_imports(dvc_stages, stage_name):
    module, _ = STAGES[stage_name]
    stage = dvc_stages[stage_name]
    stage = stage.get("do", stage)
    expected = stage_code(module) | code_closure(*PACKAGED.get(stage_name, ()))
    declared = _code_deps(stage)
    assert declared == expected, (f"dvc.yaml stage {stage_name}: missing {sorted(expected - declared)}, "
                                  f"not used {sorted(declared - expected)}")


@pytest.mark.parametrize("stage_name", sorted(STAGES))
def test_stage_declares_exactly_the_params_its_config_reads(dvc_stages, stage_name):
    _, config = STAGES[stage_name]
    stage = dvc_stages[stage_name]
    stage = stage.get("do", stage)
    declared = {p for p in stage.get("params", []) if isinstance(p, str)}
    assert declared == set(STEP_CONFIGS[config].param_keys()), stage_name


def test_the_training_runs_share_one_definition(dvc_stages):
    train = dvc_stages["train"]
    assert "foreach" in train and "do" in train
    runs = train["foreach"]
    assert len(runs) == 2 and len({r["out"] for r in runs.values()}) == 2


def test_closure_follows_lazy_imports():
    """An import inside a function counts: it runs whenever that path runs."""
    files = code_closure("components.evaluate")
    assert "model/inference.py" in files  # imported at module level
    assert "model/text_encoders.py" in files  # imported inside _languages_of
