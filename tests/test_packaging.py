"""The wheel installs one top-level package, `covspec`, and the `covspec` command lists its jobs."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from covspec.scripts.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("modeling", "training", "data", "inference", "scripts")
SUBCOMMANDS = (
    "toy-data",
    "toy-target",
    "toy-eval",
    "train",
    "bench",
    "simulate",
    "export-checkpoint",
    "export",
    "publish",
    "eval",
    "collect-acceptance",
    "calibrate-acceptance",
    "video-sweep",
)


def _build_wheel(tmp_path: Path) -> Path:
    """Build from a copy so that no `build/` or `*.egg-info` lands in the repository."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in PACKAGE_DIRS:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    # offline: no index, no build isolation (uses the installed setuptools), no dependencies
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation"]
        + ["-w", str(dist), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    wheels = list(dist.glob("covspec-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_installs_only_the_covspec_namespace(tmp_path):
    with zipfile.ZipFile(_build_wheel(tmp_path)) as whl:
        names = whl.namelist()
        dist_info = [n for n in {n.split("/")[0] for n in names} if n.endswith(".dist-info")]
        assert len(dist_info) == 1, dist_info
        top = {n.split("/")[0] for n in names}
        assert top == {"covspec", dist_info[0]}, top
        for generic in (*PACKAGE_DIRS, "tests", "recipes", "checkpoints"):
            assert generic not in top
        for sub in PACKAGE_DIRS:
            assert f"covspec/{sub}/__init__.py" in names, sub
        assert "covspec/modeling/drafter.py" in names
        assert "covspec/scripts/cli.py" in names
        assert "covspec/training/distill.py" in names
        assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
        entry_points = whl.read(f"{dist_info[0]}/entry_points.txt").decode()
    lines = [line.replace(" ", "") for line in entry_points.splitlines()]
    assert "[console_scripts]" in lines
    assert "covspec=covspec.scripts.cli:main" in lines


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])  # exactly what `covspec --help` runs
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text == build_parser().format_help()
    listed = set(re.search(r"\{([a-z,-]+)\}", text).group(1).split(","))
    assert set(SUBCOMMANDS) == listed, sorted(listed)  # a new command joins this list
    for name in SUBCOMMANDS:  # each with its one-line help in the listing
        assert re.search(rf"^\s+{name}\s+\S", text, re.M), f"no help line for {name}"


def test_runner_and_models_never_import_lightning():
    """inference/ and modeling/ stay usable without Lightning (a serving box has none)."""
    mods = [
        f"covspec.{p.parent.name}.{p.stem}"
        for d in ("inference", "modeling")
        for p in sorted((ROOT / d).glob("*.py"))
        if p.stem != "__init__"
    ]
    script = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
