"""The package as users install it: every subpackage and the recipes ship in the wheel; its modules import
each other without cycles."""

import ast
import graphlib
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ar2dlm").rglob("__init__.py")}
    assert found | {"ar2dlm.recipes"} == listed


def test_wheel_ships_the_recipes_and_finds_them(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("ar2dlm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    recipes = sorted(p.relative_to(ROOT / "recipes").as_posix() for p in (ROOT / "recipes").rglob("*.yaml"))
    assert recipes and all(f"ar2dlm/recipes/{name}" in names for name in recipes)
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    found = subprocess.run(
        [sys.executable, "-c", "from ar2dlm.config import recipes_dir; print(recipes_dir())"],
        capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""}, timeout=120,
    )
    assert found.returncode == 0, found.stderr[-2000:]
    assert Path(found.stdout.strip()) == target / "ar2dlm" / "recipes"


def test_the_modules_import_each_other_without_cycles():
    """Imports inside functions count too: a cycle means two modules share a concept that belongs in one."""
    modules = {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
               for path in (ROOT / "ar2dlm").rglob("*.py")}
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in modules and target != name}
    list(graphlib.TopologicalSorter(graph).static_order())  # CycleError names the modules of a cycle
