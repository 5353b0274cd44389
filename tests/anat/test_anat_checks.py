"""Input checks and reorientation: refusals, repairs, flags, RAS round trip."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from bidsapp.anat.checks import check_t1w, load_t1w, reorient_like, reorient_to_ras
from bidsapp.errors import ImageError, InputMissingError


def _head(shape=(48, 56, 48), seed=0) -> np.ndarray:
    """Ellipsoid 'head' with texture: many distinct values, a dark background."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    radius = np.array(shape) * 0.4
    inside = (((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) <= 1
    return (inside * (300 + 50 * np.sin(grid[0] / 3)) + rng.normal(0, 5, shape)).astype(np.float32)


def _write(path, data, affine=None, zooms=(2.0, 2.0, 2.0)):
    if affine is None:
        affine = np.diag([*zooms, 1.0])
    nib.Nifti1Image(data, affine).to_filename(path)
    return path


def _psr_affine(zoom=2.0):
    """IXI-like voxel order: i -> posterior, j -> superior, k -> right."""
    return np.array([[0, 0, zoom, -90], [-zoom, 0, 0, 110], [0, zoom, 0, -70], [0, 0, 0, 1]], dtype=float)


def test_reorient_round_trip_keeps_world_positions():
    data = _head()
    img = nib.Nifti1Image(data, _psr_affine())
    ras = reorient_to_ras(img)
    assert "".join(nib.aff2axcodes(ras.affine)) == "RAS"
    assert ras.get_data_dtype() == np.float32
    # every voxel keeps its world position: compare values at the same world points
    rng = np.random.default_rng(1)
    for ijk in rng.integers(0, np.array(data.shape), size=(20, 3)):
        world = img.affine @ np.r_[ijk, 1.0]
        ras_ijk = np.round(np.linalg.solve(ras.affine, world)[:3]).astype(int)
        assert ras.get_fdata()[tuple(ras_ijk)] == pytest.approx(data[tuple(ijk)])
    back = reorient_like(ras, img)
    np.testing.assert_array_equal(back.get_fdata(), data)
    np.testing.assert_allclose(back.affine, img.affine)


def test_reorient_like_refuses_a_foreign_grid():
    img = nib.Nifti1Image(_head(), _psr_affine())
    other = nib.Nifti1Image(_head(), np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="not on the RAS-reoriented grid"):
        reorient_like(reorient_to_ras(img), other)


def test_load_t1w_returns_ras_float32_with_both_codes(tmp_path):
    path = _write(tmp_path / "t1w.nii.gz", _head().astype(np.int16), _psr_affine())
    img, info = load_t1w(path)
    assert "".join(nib.aff2axcodes(img.affine)) == "RAS"
    assert img.get_data_dtype() == np.float32
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    assert info.orientation == "PSR" and info.shape == [48, 56, 48]
    assert info.voxel_size_mm == [2.0, 2.0, 2.0]
    assert not (info.thick_slice or info.anisotropic or info.oblique) and info.warnings == []


def test_trailing_singleton_dimension_is_accepted(tmp_path):
    path = _write(tmp_path / "t1w.nii.gz", _head()[..., None])
    img, info = load_t1w(path)
    assert img.shape == (48, 56, 48) and info.shape == [48, 56, 48]


def test_missing_file_is_input_missing(tmp_path):
    with pytest.raises(InputMissingError, match="not found"):
        check_t1w(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize("content", [b"", b"this is not a nifti file at all" * 10])
def test_garbage_file_is_refused(tmp_path, content):
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(gzip.compress(content))
    with pytest.raises(ImageError, match=r"bad\.nii\.gz: cannot be read as NIfTI"):
        check_t1w(path)


def test_truncated_file_is_refused(tmp_path):
    path = _write(tmp_path / "t1w.nii.gz", _head(seed=3))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageError, match=r"t1w\.nii\.gz: (is corrupt or truncated|cannot be read)"):
        check_t1w(path)


def test_4d_with_volumes_is_refused(tmp_path):
    path = _write(tmp_path / "bold.nii.gz", np.stack([_head()] * 3, axis=-1))
    with pytest.raises(ImageError, match="is 4D with 3 volumes.*extract one volume"):
        check_t1w(path)


def test_2d_is_refused(tmp_path):
    path = _write(tmp_path / "slice.nii.gz", _head()[:, :, 20])
    with pytest.raises(ImageError, match="is not a 3D image"):
        check_t1w(path)


def test_single_slice_volume_is_refused(tmp_path):
    path = _write(tmp_path / "slice.nii.gz", _head()[:, :, 20:21])
    with pytest.raises(ImageError, match="is not a 3D image"):
        check_t1w(path)


def test_constant_image_is_refused(tmp_path):
    path = _write(tmp_path / "zeros.nii.gz", np.zeros((48, 56, 48), np.float32))
    with pytest.raises(ImageError, match="is constant"):
        check_t1w(path)


def test_mask_like_image_is_refused(tmp_path):
    path = _write(tmp_path / "mask.nii.gz", (_head() > 100).astype(np.uint8))
    with pytest.raises(ImageError, match="distinct values"):
        check_t1w(path)


@pytest.mark.parametrize("zoom", [0.2, 9.0])
def test_absurd_voxel_sizes_are_refused(tmp_path, zoom):
    path = _write(tmp_path / "t1w.nii.gz", _head(), zooms=(zoom,) * 3)
    with pytest.raises(ImageError, match="voxel size .* outside 0.3-8.0 mm"):
        check_t1w(path)


def test_small_field_of_view_is_refused(tmp_path):
    path = _write(tmp_path / "t1w.nii.gz", _head((48, 56, 20)), zooms=(2.0, 2.0, 2.0))
    with pytest.raises(ImageError, match="covers only .* whole brain"):
        check_t1w(path)


def test_few_nan_voxels_are_repaired_with_a_warning(tmp_path):
    data = _head()
    data[0, 0, :10] = np.nan
    data[1, 0, :5] = np.inf
    img, info = load_t1w(_write(tmp_path / "t1w.nii.gz", data))
    assert info.nonfinite_voxels == 15
    assert np.isfinite(img.get_fdata()).all()
    assert any("15 NaN/Inf voxels were set to 0" in w for w in info.warnings)


def test_many_nan_voxels_are_refused(tmp_path):
    data = _head()
    data[:, :, :5] = np.nan
    with pytest.raises(ImageError, match="NaN/Inf voxels"):
        check_t1w(_write(tmp_path / "t1w.nii.gz", data))


def test_thick_slice_anisotropic_and_oblique_flags(tmp_path):
    thick = check_t1w(_write(tmp_path / "thick.nii.gz", _head((200, 200, 24)), zooms=(1.0, 1.0, 5.0)))
    assert thick.thick_slice and thick.anisotropic and not thick.oblique
    assert any("thick slices" in w for w in thick.warnings)

    aniso = check_t1w(_write(tmp_path / "aniso.nii.gz", _head((96, 96, 40)), zooms=(1.0, 1.0, 3.0)))
    assert aniso.anisotropic and not aniso.thick_slice

    angle = np.deg2rad(12.0)
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rot * 2.0
    oblique = check_t1w(_write(tmp_path / "oblique.nii.gz", _head(), affine))
    assert oblique.oblique and oblique.obliquity_deg == pytest.approx(12.0, abs=0.01)


def test_check_t1w_validates_its_argument():
    with pytest.raises(TypeError, match="path must be a path"):
        check_t1w(42)
