"""Threads are honoured (ITK pool size, torch threads), nibabel <-> ANTs geometry, argument checks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bidsapp.anat._runtime import ants_seed, check_nthreads, check_seed, from_ants, import_ants, to_ants
from bidsapp.anat.grid import new_image

REPO = Path(__file__).resolve().parents[2]

_THREADS_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from bidsapp.anat._runtime import import_ants, to_ants
    from bidsapp.anat.grid import new_image

    def threads():
        with open("/proc/self/status") as fh:
            return int(next(line for line in fh if line.startswith("Threads:")).split()[1])

    ants = import_ants(int(sys.argv[1]))
    rng = np.random.default_rng(0)
    img = to_ants(new_image(rng.uniform(50, 100, (40, 40, 40)).astype(np.float32), np.eye(4)), ants)
    ants.n4_bias_field_correction(img, shrink_factor=2, convergence={"iters": [5], "tol": 1e-7})
    print(threads())
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to count threads")
def test_itk_thread_pool_follows_omp_nthreads(tmp_path):
    script = tmp_path / "threads.py"
    script.write_text(_THREADS_SCRIPT)
    added = {}
    for n in (1, 3):
        out = subprocess.run([sys.executable, str(script), str(n), str(REPO)], capture_output=True, text=True,
                             check=True, timeout=120)
        added[n] = int(out.stdout.strip().splitlines()[-1])
    # everything else being equal, the process holds one more ITK pool thread per extra thread
    assert added[3] - added[1] == 2


def test_deepbet_thread_setting_is_scoped():
    import torch

    from bidsapp.anat.brainmask import _torch_threads

    before = torch.get_num_threads()
    with _torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_ants_geometry_round_trip_matches_reading_the_file(tmp_path):
    ants = import_ants(1)
    affine = np.array([[0, 0, 1.2, -90], [-1.0, 0, 0, 110], [0, 0.9, 0, -70], [0, 0, 0, 1]], dtype=float)
    angle = np.deg2rad(7)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine[:3, :3] = rot @ affine[:3, :3]
    data = np.random.default_rng(0).normal(size=(12, 14, 10)).astype(np.float32)
    img = new_image(data, affine)
    path = tmp_path / "img.nii.gz"
    img.to_filename(path)
    read = ants.image_read(str(path))
    converted = to_ants(img, ants)
    np.testing.assert_allclose(converted.origin, read.origin, atol=1e-4)
    np.testing.assert_allclose(converted.spacing, read.spacing, atol=1e-5)
    np.testing.assert_allclose(converted.direction, read.direction, atol=1e-5)
    np.testing.assert_array_equal(converted.numpy(), read.numpy())
    back = from_ants(read)
    np.testing.assert_allclose(back.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(back.get_fdata(), data)
    assert "".join(nib.aff2axcodes(back.affine)) == "".join(nib.aff2axcodes(affine))


def test_seed_environment_is_restored(monkeypatch):
    monkeypatch.delenv("ANTS_RANDOM_SEED", raising=False)
    import os

    with ants_seed(0):
        assert os.environ["ANTS_RANDOM_SEED"] == "1"  # 0 would mean "clock" to ANTs
    assert "ANTS_RANDOM_SEED" not in os.environ


@pytest.mark.parametrize("bad, error", [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_nthreads_validation(bad, error):
    with pytest.raises(error, match="omp_nthreads"):
        check_nthreads(bad)


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (2**31, ValueError), ("1", TypeError)])
def test_seed_validation(bad, error):
    with pytest.raises(error, match="random_seed"):
        check_seed(bad)
