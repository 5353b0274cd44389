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
