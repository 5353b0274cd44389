"""End to end: ``brainage ixi out participant`` on one real IXI scan without network access,
then a rerun that resumes."""

import json
import os
import subprocess
import sys
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bidsapp.cli.run import main

REPO = Path(__file__).resolve().parents[2]

SUBJECT = "IXI012"


@pytest.fixture(scope="module")
def ixi_run(ixi_dir, tmp_path_factory):
    # a one-participant copy of the dataset, so that the rerun test may touch its files
    bids = tmp_path_factory.mktemp("ixi") / "ixi-hh"
    bids.mkdir()
    for name in ("README", "dataset_description.json", "participants.json"):
        shutil.copy(ixi_dir / name, bids / name)
    lines = (ixi_dir / "participants.tsv").read_text().splitlines()
    (bids / "participants.tsv").write_text(
        "\n".join([lines[0]] + [ln for ln in lines[1:] if ln.startswith(f"sub-{SUBJECT}\t")]) + "\n")
    shutil.copytree(ixi_dir / f"sub-{SUBJECT}", bids / f"sub-{SUBJECT}")
    out = tmp_path_factory.mktemp("deriv")
    work = tmp_path_factory.mktemp("work")
    # the default model selection: every shipped model runs
    args = [str(bids), str(out), "participant", "--participant-label", SUBJECT,
            "--nprocs", "2", "--omp-nthreads", "2", "-w", str(work)]
    # the first run in a subprocess whose Python processes (nipype workers too) cannot reach
    # the network: every attempt is logged and refused
    env = _offline_env(tmp_path_factory.mktemp("offline"))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bidsapp", *args], env=env, cwd=REPO,
                          capture_output=True, text=True)
    first = time.monotonic() - start
    return {"out": out, "work": work, "args": args, "code": proc.returncode, "seconds": first,
            "stderr": proc.stderr, "env": env, "netlog": Path(env["BRAINAGE_TEST_NETLOG"])}


_SITECUSTOMIZE = """
import os, socket

_LOG = os.environ["BRAINAGE_TEST_NETLOG"]


def _refuse(what):
    with open(_LOG, "a", encoding="utf-8") as handle:
        handle.write(f"{os.getpid()} {what!r}\\n")
    raise OSError(f"network access blocked by the offline test: {what!r}")


def _remote(address):
    host = address[0] if isinstance(address, tuple) else address
    return not (isinstance(host, str) and (host in ("localhost", "::1") or host.startswith("127.")))


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and _remote(address):
        _refuse(address)
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and _remote(address):
        _refuse(address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host is not None and _remote((host if isinstance(host, str) else host.decode(),)):
        _refuse(host)
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
"""


def _offline_env(folder: Path) -> dict[str, str]:
    """Environment whose Python processes refuse (and log) every non-loopback connection."""
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(REPO), env.get("PYTHONPATH", "")])
    env["BRAINAGE_TEST_NETLOG"] = str(folder / "network-attempts.log")
    return env


def test_offline_guard_refuses_connections(ixi_run):
    # the guard of the run below is real: a download attempt under the same environment fails
    probe = subprocess.run([sys.executable, "-c", "import urllib.request; "
                            "urllib.request.urlopen('https://example.org', timeout=5)"],
                           env=ixi_run["env"], capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked by the offline test" in probe.stderr
    assert "example.org" in ixi_run["netlog"].read_text()


def test_exit_zero_and_files(ixi_run):
    assert ixi_run["code"] == 0, ixi_run["stderr"][-3000:]
    # the whole participant level (preprocessing, every shipped model, reports) ran offline;
    # read before the probe above may write the log (test order: the probe runs first, so
    # only lines not about the probe count)
    attempts = (ixi_run["netlog"].read_text().splitlines() if ixi_run["netlog"].is_file() else [])
    assert [a for a in attempts if "example.org" not in a] == []
    anat = ixi_run["out"] / f"sub-{SUBJECT}" / "anat"
    prefix = f"sub-{SUBJECT}"
    for name in ("desc-preproc_T1w.nii.gz", "desc-brain_mask.nii.gz", "dseg.nii.gz",
                 "label-GM_probseg.nii.gz", "from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.h5",
                 "from-MNI152NLin2009aSym_to-T1w_mode-image_xfm.h5",
                 "space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz",
                 "space-MNI152NLin2009aSym_res-2_label-GM_desc-modulated_probseg.nii.gz",
                 "space-MNI152NLin2009aSym_res-1p5_label-WM_desc-modulated_probseg.nii.gz", "qc.json"):
        assert (anat / f"{prefix}_{name}").is_file(), name
    assert (ixi_run["out"] / f"sub-{SUBJECT}.html").is_file()
    assert not list(ixi_run["out"].rglob("*.part"))


def test_plausible_volumes(ixi_run):
    qc = json.loads((ixi_run["out"] / f"sub-{SUBJECT}" / "anat" / f"sub-{SUBJECT}_qc.json").read_text())
    assert 900 <= qc["mask_volume_ml"] <= 2000
    assert 400 <= qc["gm_volume_ml"] <= 900 and 300 <= qc["wm_volume_ml"] <= 700
    assert qc["scan_info"]["age"] == pytest.approx(38.78)
    mask = nib.load(ixi_run["out"] / f"sub-{SUBJECT}" / "anat" / f"sub-{SUBJECT}_desc-brain_mask.nii.gz")
    voxel_ml = np.prod(mask.header.get_zooms()[:3]) / 1000
    assert np.asarray(mask.dataobj).astype(bool).sum() * voxel_ml == pytest.approx(qc["mask_volume_ml"], rel=1e-3)
    assert nib.aff2axcodes(mask.affine) == ("R", "A", "S")


def test_derivatives_validate(ixi_run):
    if shutil.which("bids-validator-deno") is None:
        pytest.skip("bids-validator-deno not installed")
    proc = subprocess.run(["bids-validator-deno", "--format", "json", str(ixi_run["out"])],
                          capture_output=True, text=True, check=False)
    issues = json.loads(proc.stdout)["issues"]["issues"]
    errors = [i for i in issues if i["severity"] == "error"]
    assert errors == [], errors[:3]


def test_rerun_resumes_from_cache(ixi_run):
    # a new modification time (a re-fetched or re-mounted dataset) must not invalidate the
    # cache: nipype hashes the inputs by content
    t1w = next((Path(ixi_run["args"][0]) / f"sub-{SUBJECT}" / "anat").glob("*_T1w.nii.gz"))
    t1w.chmod(0o644)
    os.utime(t1w, (time.time() + 3600, time.time() + 3600))
    results = {p: p.stat().st_mtime_ns for p in ixi_run["work"].rglob("result_*.pklz")}
    assert main(ixi_run["args"]) == 0
    # only the derivative sinks (overwrite=True) run again; every computing node is reused
    rerun = sorted(p.parent.name for p, t in results.items() if p.stat().st_mtime_ns != t)
    assert len(results) > 10 and all(name.startswith("ds_") for name in rerun), rerun


def test_shipped_models_predict(ixi_run):
    from bidsapp.inference import available_models

    shipped = [m for m in available_models() if m != "ensemble"]
    if not shipped:
        pytest.skip("no model shipped in this checkout")
    anat = ixi_run["out"] / f"sub-{SUBJECT}" / "anat"
    lines = (anat / f"sub-{SUBJECT}_brainage.tsv").read_text().splitlines()
    rows = {r["model"]: r for r in (dict(zip(lines[0].split("\t"), line.split("\t")))
                                    for line in lines[1:])}
    assert set(shipped) <= set(rows)
    for model in shipped:
        row = rows[model]
        age, lower, upper = float(row["brain_age"]), float(row["brain_age_lower"]), \
            float(row["brain_age_upper"])
        assert lower <= age <= upper and 10 < age < 95  # an adult of 38.8 years
        assert float(row["age"]) == pytest.approx(38.78, abs=1e-3)
        assert float(row["brain_pad"]) == pytest.approx(age - 38.78, abs=2e-3)
    if "densenet-clinical" in shipped:
        native = nib.load(anat / f"sub-{SUBJECT}_desc-densenetclinical_relevancemap.nii.gz")
        t1w = nib.load(anat / f"sub-{SUBJECT}_desc-preproc_T1w.nii.gz")
        assert native.shape == t1w.shape and np.allclose(native.affine, t1w.affine)
        mni = nib.load(anat / f"sub-{SUBJECT}_space-MNI152NLin2009aSym_res-2_desc-densenetclinical"
                              "_relevancemap.nii.gz")
        assert mni.shape == (99, 117, 95)
        data = np.asarray(native.dataobj)
        mask = np.asarray(nib.load(anat / f"sub-{SUBJECT}_desc-brain_mask.nii.gz").dataobj) > 0
        # relevance lives in the brain: the map is zero outside the skull-stripped input
        assert data[mask].sum() > 0 and np.all(data[~mask] == 0)
        report = (ixi_run["out"] / f"sub-{SUBJECT}.html").read_text()
        assert "densenet-clinical" in report and "densenetclinical_relevancemap" in report
    if "local-unet" in shipped:
        prefix = f"sub-{SUBJECT}_space-MNI152NLin2009aSym_res-2_desc-localunet_"
        age_map = np.asarray(nib.load(anat / f"{prefix}brainagemap.nii.gz").dataobj)
        sd_map = np.asarray(nib.load(anat / f"{prefix}brainagesdmap.nii.gz").dataobj)
        pad_map = np.asarray(nib.load(anat / f"{prefix}brainpadmap.nii.gz").dataobj)
        assert age_map.shape == (99, 117, 95)
        inside = np.isfinite(age_map)
        # the global row is the mean of the map over the brain; the PAD map is the map - age
        assert float(rows["local-unet"]["brain_age"]) == pytest.approx(
            float(np.mean(age_map[inside], dtype=np.float64)), abs=0.05)
        np.testing.assert_allclose(pad_map[inside], age_map[inside] - 38.78, atol=2e-3)
        assert np.all(sd_map[inside] >= 0) and np.isfinite(sd_map[inside]).all()
        assert 1e5 < inside.sum() < 3e5  # the template brain on the 2 mm grid
        rois = (anat / f"{prefix}brainageroi.tsv").read_text().splitlines()
        assert len(rois) > 100  # Harvard-Oxford: 96 cortical + 17 subcortical labels
        report = (ixi_run["out"] / f"sub-{SUBJECT}.html").read_text()
        assert "localunet_brainpadmap" in report or "localunet_brainagemap" in report
    if "diffusion-ae" in shipped:
        stem = f"sub-{SUBJECT}_space-MNI152NLin2009aSym_desc-diffusionae"
        source = nib.load(anat / f"{stem}_inputslice.nii.gz")
        recon = nib.load(anat / f"{stem}_reconslice.nii.gz")
        assert source.shape == recon.shape and np.allclose(source.affine, recon.affine)
        meta = json.loads((anat / f"{stem}_reconslice.json").read_text())
        # a real adult's slice: the autoencoder reconstructs it well (held-out SSIM 0.94)
        assert 0.7 < meta["SSIM"] <= 1.0 and meta["PSNR"] > 25
        report = (ixi_run["out"] / f"sub-{SUBJECT}.html").read_text()
        assert "diffusionae_reconslice" in report
