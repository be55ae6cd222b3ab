"""The package installs and runs outside the checkout: a built wheel carries its data files.

A collaborator who installs the tool to verify shards gets the class lists,
the model registry and the recipes with it (read through importlib.resources),
and the commands work from any working folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pipeline", "builders", "eval", "data_manifests", "setup.cfg", "pyproject.toml", "README.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (so the checkout stays clean)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (built,) = dist.glob("bgcheck-*.whl")
    return built


def test_the_wheel_carries_the_data_files(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for data in ("data_manifests/models.json", "data_manifests/imagenet_classes.tsv", "data_manifests/in_to_in9.json",
                 "data_manifests/in9_classes.txt", "data_manifests/recipes/imagenet9.json",
                 "data_manifests/recipes/background_check.json", "data_manifests/demo/annotations.json"):
        assert data in names, data
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]


def test_an_installed_wheel_builds_and_verifies_the_demo_from_another_folder(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                           str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "BGCHECK_CACHE": str(tmp_path / "cache")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)

    where = run("-c", "import builders, data_manifests, eval; print(builders.__file__, data_manifests.__file__)")
    assert where.returncode == 0, where.stderr
    assert all(path.startswith(str(site)) for path in where.stdout.split()), where.stdout
    built = run("-m", "builders.make_shards", "--recipe", "background_check", "--out", "shards", "--no-progress")
    assert built.returncode == 0, built.stderr[-2000:]
    manifest = json.loads((elsewhere / "shards" / "original" / "manifest.json").read_text())
    assert manifest["totals"]["samples"] > 0 and manifest["config"]["fill"] == "white"
    checked = run("-m", "builders.verify", "shards")
    assert checked.returncode == 0 and checked.stdout.startswith("OK"), checked.stdout + checked.stderr


def test_every_console_script_names_a_command_with_help(wheel, tmp_path):
    """Each console script of the wheel points at a ``main`` that answers ``--help`` (exit 0, its own usage)."""
    with zipfile.ZipFile(wheel) as zf:
        (entry_points,) = [n for n in zf.namelist() if n.endswith("entry_points.txt")]
        lines = zf.read(entry_points).decode().splitlines()
    scripts = dict(line.split(" = ") for line in lines if " = " in line)
    assert {"bgcheck-score", "bgcheck-challenge", "bgcheck-report"} <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        code = f"import sys; from {module} import {func} as main; sys.argv = ['{name}', '--help']; main()"
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (name, proc.stderr[-500:])
