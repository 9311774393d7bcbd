"""The package: pyproject.toml installs `training` so that it imports from any folder, with its dependencies those
of requirements.txt."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    """The distribution name of a requirement line."""
    return re.split(r"[<>=!~ ;\[]", requirement.strip(), maxsplit=1)[0].lower()


def test_dependencies_are_the_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    runtime = sorted(ln for ln in lines if _name(ln) != "pytest")
    assert sorted(project["dependencies"]) == runtime
    assert project["optional-dependencies"]["test"] == [ln for ln in lines if _name(ln) == "pytest"]


def test_installed_package_imports_from_another_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "training", src / "training", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import training, importlib.metadata as md; from training import load_sweep, load_dictionary; "
            "from training.dashboards import ASSETS; "
            "print(training.__file__); print(md.version('sae-toolkit')); print(sorted(p.name for p in ASSETS.iterdir()))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, check=True, capture_output=True,
                         text=True).stdout.splitlines()
    assert Path(out[0]).resolve() == (target / "training" / "__init__.py").resolve()
    assert out[1] == re.search(r'__version__ = "(.+)"', (ROOT / "training" / "__init__.py").read_text()).group(1)
    assert out[2] == str(["index.js", "style.css"])
