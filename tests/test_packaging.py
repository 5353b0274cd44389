"""Packaging: every subpackage is installed, and the installed console script works outside the checkout."""

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _declared_packages() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}


def test_every_subpackage_is_declared():
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "bidsapp").rglob("__init__.py")
             if "tests" not in p.parts}
    missing = found - _declared_packages()
    assert not missing, f"add to setup.cfg [options] packages: {sorted(missing)}"


def test_installed_console_script(tmp_path):
    exe = shutil.which("brainage")
    if exe is None:
        pytest.skip("brainage is not installed (pip install . first)")
    proc = subprocess.run([exe, "--version"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "brainage v" in proc.stdout


def _shipped_files() -> list[str]:
    """Each shipped model folder's card, the files it names (weights, split, CV predictions),
    as paths relative to ``models/``."""
    import json

    files = []
    for card in sorted((REPO / "models").glob("*/model_card.json")):
        content = json.loads(card.read_text())
        named = [w["file"] for w in content.get("weights", [])]
        named += [content.get("split", {}).get("file"),
                  content.get("metrics", {}).get("cross_validation", {}).get("predictions")]
        files += [f"{card.parent.name}/{card.name}"]
        files += [f"{card.parent.name}/{name}" for name in named if name]
    return files


def test_every_shipped_weight_file_is_package_data():
    """Each model card and each file it names matches a package-data pattern, so it is installed."""
    import fnmatch

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["bidsapp._models"].split(",")]
    files = _shipped_files()
    # fnmatch's '*' also matches '/', so compare path depth as setuptools' glob does
    unmatched = [f for f in files if not any(fnmatch.fnmatch(f, p) and f.count("/") == p.count("/")
                                             for p in patterns)]
    assert any(f.endswith(".pt") for f in files), "no shipped weights found in models/*/model_card.json"
    assert unmatched == [], f"add a pattern for {unmatched[:3]} to [options.package_data]"


def test_built_wheel_has_a_card_next_to_every_weight_file(tmp_path):
    """Build the wheel from a copy of the sources: every ``.pt`` in it has ``model_card.json`` in
    its folder, that card names it with the sha256 of the packaged bytes, and every file a
    shipped card names is packaged."""
    import hashlib
    import json
    import posixpath
    import sys
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("bidsapp", "training", "models"):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("brainage-*.whl")
    prefix = "bidsapp/_models/"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        weights = sorted(n for n in names if n.startswith(prefix) and n.endswith(".pt"))
        assert weights, "the wheel holds no model weights"
        for name in weights:
            card_name = posixpath.join(posixpath.dirname(name), "model_card.json")
            assert card_name in names, f"{name} has no model_card.json next to it in the wheel"
            entries = {w["file"]: w["sha256"] for w in json.loads(archive.read(card_name))["weights"]}
            assert posixpath.basename(name) in entries, f"{card_name} does not name {name}"
            assert hashlib.sha256(archive.read(name)).hexdigest() == entries[posixpath.basename(name)]
            assert name[:-len(".pt")] + ".json" in names, f"{name} has no weight card in the wheel"
    missing = [f for f in _shipped_files() if prefix + f not in names]
    assert missing == [], f"not packaged: {missing[:3]}"
