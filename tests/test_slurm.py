"""bin/slurm_participant_array.sh and bin/slurm_group.sh, run without SLURM.

The tests set the variables SLURM would set. brainage itself runs for real, from the checkout
(``BRAINAGE_CMD``), on participants that fail fast with a documented exit code. A full
participant run takes minutes; the container tests cover it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthetic_images import blob_t1w, write_image

REPO = Path(__file__).resolve().parents[1]
ARRAY = REPO / "bin" / "slurm_participant_array.sh"
GROUP = REPO / "bin" / "slurm_group.sh"


@pytest.fixture
def cohort(tmp_path) -> Path:
    """sub-01 usable; sub-02's T1w truncated (exit 65); sub-03 listed without data (exit 18)."""
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "slurm", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    (root / "participants.tsv").write_text(
        "age\tparticipant_id\r\n34.5\tsub-01\r\n40\tsub-02\r\n50\tsub-03\r\n")  # id not first, CRLF
    good = write_image(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", blob_t1w(seed=1))
    bad = root / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(good.read_bytes()[:300])
    return root


def _env(tmp_path: Path, **extra) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update(BRAINAGE_CMD=f"{sys.executable} {REPO / 'bin' / 'brainage'}", SLURM_ARRAY_JOB_ID="4242",
               SLURM_CPUS_PER_TASK="1", SLURM_MEM_PER_NODE="2000", BRAINAGE_WORK_ROOT=str(tmp_path / "work"))
    env.update(extra)
    return env


def _run(script: Path, *args, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, check=False, timeout=600)


def test_count_and_participant_lists(cohort, tmp_path):
    env = _env(tmp_path)
    assert _run(ARRAY, "--count", cohort, env=env, cwd=tmp_path).stdout == "3\n"
    listing = tmp_path / "list.txt"
    listing.write_text("# reruns\nsub-03\n\n 02 \n")
    proc = _run(ARRAY, "--count", cohort, env={**env, "BRAINAGE_PARTICIPANTS": str(listing)}, cwd=tmp_path)
    assert proc.stdout == "2\n"
    (cohort / "participants.tsv").unlink()  # falls back to the sub-* folders
    assert _run(ARRAY, "--count", cohort, env=env, cwd=tmp_path).stdout == "2\n"
    proc = _run(ARRAY, "--count", tmp_path / "nope", env=env, cwd=tmp_path)
    assert proc.returncode == 64 and "does not exist" in proc.stderr


@pytest.mark.parametrize("task", ["", "0", "4", "x"])
def test_task_without_participant_is_a_usage_error(cohort, tmp_path, task):
    proc = _run(ARRAY, cohort, tmp_path / "out", env=_env(tmp_path, SLURM_ARRAY_TASK_ID=task), cwd=tmp_path)
    assert proc.returncode == 64 and "slurm_participant_array" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_tasks_record_exit_codes_and_group_tabulates_them(cohort, tmp_path):
    out = tmp_path / "out"
    codes = {}
    for task, label in ((2, "02"), (3, "03")):  # task 1 (sub-01) would preprocess for minutes
        proc = _run(ARRAY, cohort, out, "--skip-bids-validation",
                    env=_env(tmp_path, SLURM_ARRAY_TASK_ID=str(task)), cwd=tmp_path)
        record = out / "logs" / "slurm" / f"sub-{label}.exitcode"
        assert record.read_text() == f"{proc.returncode}\n"
        assert f"-w {tmp_path / 'work' / f'sub-{label}'} --nprocs 1 --omp-nthreads 1 --mem 2000M " \
               "--skip-bids-validation" in proc.stderr  # own work dir; the job's CPUs and memory
        codes[label] = proc.returncode
    assert codes == {"02": 65, "03": 18}  # brainage's documented codes: unusable image, empty selection

    proc = _run(GROUP, cohort, out, "--n-perm", "10", env=_env(tmp_path), cwd=tmp_path)
    table = (out / "logs" / "slurm" / "exitcodes.tsv").read_text().splitlines()
    assert table == ["participant_id\texit_code\tstatus", "sub-01\tn/a\tmissing", "sub-02\t65\tfailed",
                     "sub-03\t18\tfailed"]
    assert "0 succeeded, 2 failed, 1 missing" in proc.stderr
    assert proc.returncode == 66  # brainage group: no participant outputs to analyse

    proc = _run(GROUP, cohort, out, env=_env(tmp_path, BRAINAGE_REQUIRE_ALL="1"), cwd=tmp_path)
    assert proc.returncode == 1 and "group level not run" in proc.stderr


def test_task_survives_sigterm_to_record_the_code(cohort, tmp_path):
    """scancel or the time limit signal the whole job: the script must still record brainage's code."""
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(ARRAY), str(cohort), str(out), "--skip-bids-validation"],
                            env=_env(tmp_path, SLURM_ARRAY_TASK_ID="1"), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM: every process of the job
    _, err = proc.communicate(timeout=300)
    record = out / "logs" / "slurm" / "sub-01.exitcode"
    assert record.is_file(), err
    assert record.read_text() == f"{proc.returncode}\n" and proc.returncode == 130
