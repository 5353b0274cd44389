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


def test_every_shipped_weight_file_is_package_data():
    """Each weight file a shipped card names matches a package-data pattern, so it is installed."""
    import fnmatch
    import json

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["bidsapp._models"].split(",")]
    files = [w["file"] for card in (REPO / "models").glob("*.json")
             for w in json.loads(card.read_text()).get("weights", [])]
    # fnmatch's '*' also matches '/', so compare path depth as setuptools' glob does
    unmatched = [f for f in files if not any(fnmatch.fnmatch(f, p) and f.count("/") == p.count("/")
                                             for p in patterns)]
    assert files and unmatched == [], f"add a pattern for {unmatched[:3]} to [options.package_data]"
