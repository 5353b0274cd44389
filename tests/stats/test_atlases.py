"""Harvard-Oxford loader and ROI summaries."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from bidsapp.atlases import load_harvard_oxford, roi_means, roi_volumes


@pytest.fixture(scope="module")
def atlas_2mm():
    return load_harvard_oxford()


@pytest.mark.parametrize("xyz, name", [((-26, -22, -14), "Left_Hippocampus"),
                                        ((24, -4, -20), "Right_Amygdala"),
                                        ((-10, -18, 8), "Left_Thalamus"),
                                        ((44, -20, 50), "Right_Postcentral_Gyrus"),
                                        ((0, 0, 84), None)])
def test_known_structures_at_mni_coordinates(atlas_2mm, xyz, name):
    img, table = atlas_2mm
    ijk = np.round(np.linalg.inv(img.affine) @ np.r_[xyz, 1])[:3].astype(int)
    value = int(np.asarray(img.dataobj)[tuple(ijk)])
    if name is None:      # above the brain: background
        assert value == 0
    else:
        assert table.set_index("index").loc[value, "name"] == name


def test_table_and_grid(atlas_2mm):
    img, table = atlas_2mm
    assert img.shape == (99, 117, 95)
    assert len(table) == 113
    assert (table["atlas"] == "cortical").sum() == 96 and (table["atlas"] == "subcortical").sum() == 17
    assert set(np.unique(np.asarray(img.dataobj))) <= set(table["index"]) | {0}
    other = nib.Nifti1Image(np.zeros((10, 12, 10)), np.diag([4.0, 4, 4, 1]) + np.c_[np.zeros((4, 3)),
                                                                                    [-20, -24, -20, 0]])
    small, _ = load_harvard_oxford(other)
    assert small.shape == (10, 12, 10) and np.allclose(small.affine, other.affine)
    with pytest.raises(ValueError, match="threshold"):
        load_harvard_oxford(threshold=150)


def test_roi_volumes_and_means_known_answers():
    labels = np.array([1, 1, 2, 2, 2, 0])
    gm = np.array([[0.5, 0.5, 1.0, 1.0, 0.0, 9.0], [1.0, 1.0, 0.2, 0.2, 0.2, 9.0]])
    np.testing.assert_allclose(roi_volumes(gm, labels, [1, 2, 3], 8.0), [[8.0, 16.0, 0.0], [16.0, 4.8, 0.0]])
    ba = np.array([[50.0, np.nan, 60, 70, 80, 0]])
    out = roi_means(ba, labels, [1, 2, 3])
    np.testing.assert_allclose(out[:, :2], [[50.0, 70.0]])
    assert np.isnan(out[0, 2])
    with pytest.raises(ValueError, match="disagree"):
        roi_volumes(gm, labels[:3], [1], 8.0)
