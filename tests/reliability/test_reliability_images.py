"""Reliability: T1w images.

Unusable images are refused by the participant level's preflight, before any processing: exit 65,
one line naming the file and what to do, nothing written.  Usable but unusual images are
accepted by the same input checks (``load_t1w``, the first node of every T1w workflow) with the
flag or warning that reaches the QC file; test_reliability_real_runs.py runs some of them end to
end.

Already covered and not repeated: truncated ``.nii.gz`` and 4D (tests/cli/test_exit_codes.py);
unreadable bytes, single slice, small field of view, few NaN repaired, thick-slice, anisotropic and
oblique flags at the input level (tests/anat/test_anat_checks.py).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from reliability_cases import (T1W, assert_nothing_written, blob_t1w, make_dataset, one_error_line,
                               run_brainage, write_image)

from bidsapp.anat.checks import check_t1w, load_t1w


def _refused(tmp_path, capsys, message, *, image=None, zooms=(2.0, 2.0, 2.0), damage=None):
    bids = make_dataset(tmp_path / "ds", image=image, zooms=zooms)
    if damage:
        damage(bids / T1W)
    code, err = run_brainage(capsys, bids, tmp_path / "out")
    line = one_error_line(err)
    assert code == 65, err
    assert "sub-01_T1w.nii" in line and message in line, line
    assert_nothing_written(tmp_path / "out")
    return line


def _flip_bytes_mid_stream(path):
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(raw))


def test_corrupt_gzip_is_65(tmp_path, capsys):
    # the voxels still decode (to garbage); only the CRC at the end of the stream shows the damage
    line = _refused(tmp_path, capsys, "is corrupt or truncated (gzip stream", damage=_flip_bytes_mid_stream)
    assert "gzip -t" in line


def test_truncated_uncompressed_nifti_is_65(tmp_path, capsys):
    def truncate(path):
        img = nib.load(path)
        plain = path.with_name("sub-01_T1w.nii")
        nib.save(img, plain)
        path.unlink()
        plain.write_bytes(plain.read_bytes()[:50_000])

    bids = make_dataset(tmp_path / "ds")
    truncate(bids / T1W)
    code, err = run_brainage(capsys, bids, tmp_path / "out")
    line = one_error_line(err)
    assert code == 65 and "sub-01_T1w.nii: is corrupt or truncated" in line and "Expected" in line
    assert_nothing_written(tmp_path / "out")


def test_zero_size_file_is_65(tmp_path, capsys):
    _refused(tmp_path, capsys, "is an empty (0-byte) file", damage=lambda p: p.write_bytes(b""))


def test_2d_image_is_65(tmp_path, capsys):
    _refused(tmp_path, capsys, "is not a 3D image (shape (40, 48))", image=blob_t1w()[:, :, 20])


def test_all_zero_image_is_65(tmp_path, capsys):
    _refused(tmp_path, capsys, "is constant (every voxel is 0)", image=np.zeros((40, 48, 40), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_many_nonfinite_voxels_are_65(tmp_path, capsys, bad):
    data = blob_t1w()
    data[:4] = bad
    _refused(tmp_path, capsys, "has 7680 NaN/Inf voxels (10.0 %)", image=data)


def test_label_image_is_65(tmp_path, capsys):
    labels = (blob_t1w() > 200).astype(np.uint8) * 3
    _refused(tmp_path, capsys, "distinct values (a mask or label image?)", image=labels)


def test_voxel_size_in_metres_is_65(tmp_path, capsys):
    _refused(tmp_path, capsys, "has voxel size [0.002, 0.002, 0.002] mm", zooms=(0.002,) * 3)


def test_complex_image_is_65(tmp_path, capsys):
    _refused(tmp_path, capsys, "has non-scalar voxel type complex64",
             image=blob_t1w().astype(np.complex64))


# ----------------------------------------------------------------- accepted, flagged or warned

def _save(path, data, affine=None, **header):
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine)
    for key, value in header.items():
        img.header[key] = value
    img.to_filename(path)
    return path


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.float64])
def test_integer_and_double_types_are_accepted_as_float32(tmp_path, dtype):
    data = blob_t1w()
    if dtype == np.int8:
        data = data / 4  # int8 holds at most 127
    stored = data.astype(dtype)
    img, info = load_t1w(_save(tmp_path / "t1w.nii.gz", stored))
    assert img.get_data_dtype() == np.float32 and info.warnings == []
    np.testing.assert_array_equal(img.get_fdata(), stored.astype(np.float32))


def test_half_millimetre_voxels_are_accepted_without_flags(tmp_path):
    data = np.zeros((130, 130, 130), np.float32)
    data[5:-5, 5:-5, 5:-5] = blob_t1w((120, 120, 120))
    info = check_t1w(_save(tmp_path / "t1w.nii.gz", data, np.diag([0.5, 0.5, 0.5, 1.0])))
    assert info.voxel_size_mm == [0.5, 0.5, 0.5]
    assert not (info.thick_slice or info.anisotropic or info.oblique) and info.warnings == []


def test_six_millimetre_slices_are_flagged(tmp_path):
    info = check_t1w(_save(tmp_path / "t1w.nii.gz", blob_t1w((80, 96, 14)),
                           np.diag([1.0, 1.0, 6.0, 1.0])))
    assert info.thick_slice and info.anisotropic
    assert any("thick slices (6.0 mm)" in w for w in info.warnings)


@pytest.mark.parametrize("scale", [1e30, 1e300])
def test_huge_intensities_are_rescaled_with_a_warning(tmp_path, scale):
    """Intensities beyond float32 (1e300) used to become Inf and be refused as 'NaN/Inf voxels'."""
    data = blob_t1w().astype(np.float64) * scale
    img, info = load_t1w(_save(tmp_path / "t1w.nii.gz", data))
    out = img.get_fdata()
    assert info.nonfinite_voxels == 0 and np.isfinite(out).all()
    assert any("were divided by 1e" in w and "scl_slope" in w for w in info.warnings)
    divisor = data.max() / out.max()
    assert 1e3 < out.max() <= 1e4 and np.log10(divisor) == pytest.approx(round(np.log10(divisor)))
    np.testing.assert_allclose(out, data / divisor, rtol=1e-6)


def test_qform_sform_disagreement_warns_and_uses_the_sform(tmp_path):
    sform = np.diag([2.0, 2.0, 2.0, 1.0])
    img = nib.Nifti1Image(blob_t1w(), sform)
    qform = sform.copy()
    qform[:3, 3] = [0.0, 5.0, 0.0]
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=2)
    img.to_filename(tmp_path / "t1w.nii.gz")
    out, info = load_t1w(tmp_path / "t1w.nii.gz")
    assert any("qform and sform of the header disagree by up to 5.0 mm" in w for w in info.warnings)
    np.testing.assert_allclose(out.affine, sform)


def test_header_without_qform_or_sform_warns(tmp_path):
    img = nib.Nifti1Image(blob_t1w(), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    img.to_filename(tmp_path / "t1w.nii.gz")
    info = check_t1w(tmp_path / "t1w.nii.gz")
    assert any("neither a qform nor an sform" in w for w in info.warnings)


def test_matching_qform_and_sform_give_no_warning(tmp_path):
    path = write_image(tmp_path / "t1w.nii.gz", blob_t1w())
    img = nib.load(path)
    img.set_qform(img.affine, code=1)
    img.to_filename(path)
    assert check_t1w(path).warnings == []
