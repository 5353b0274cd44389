"""Atropos segmentation with template priors, on the template itself (identity transform)."""

from __future__ import annotations

import numpy as np
import pytest

from bidsapp.anat._runtime import import_ants
from bidsapp.anat.grid import new_image
from bidsapp.anat.qc import map_volume_ml
from bidsapp.anat.segment import segment_tissues, tpms_to_dseg
from bidsapp.errors import ImageError
from bidsapp.templates import get_template


def test_tpms_to_dseg_known_answer():
    gm = np.array([[[0.6, 0.2, 0.1, 0.9]]])
    wm = np.array([[[0.3, 0.7, 0.1, 0.05]]])
    csf = np.array([[[0.1, 0.1, 0.8, 0.05]]])
    mask = np.array([[[1, 1, 1, 0]]])
    np.testing.assert_array_equal(tpms_to_dseg([gm, wm, csf], mask), [[[1, 2, 3, 0]]])
    with pytest.raises(ValueError, match="differ in shape"):
        tpms_to_dseg([gm, wm, csf], np.ones((2, 2, 2)))


@pytest.fixture(scope="module")
def identity_xfm(tmp_path_factory):
    ants = import_ants(1)
    path = tmp_path_factory.mktemp("xfm") / "identity.mat"
    ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3), str(path))
    return path


def test_segmenting_the_template_recovers_its_priors(identity_xfm):
    tpl = get_template(2.0)
    tpms, dseg, info = segment_tissues(tpl.t1w, tpl.mask, identity_xfm, random_seed=0, omp_nthreads=2)
    mask = tpl.mask.get_fdata() > 0
    stack = np.stack([t.get_fdata() for t in tpms])
    np.testing.assert_allclose(stack.sum(0)[mask], 1.0, atol=1e-4)
    assert stack[:, ~mask].max() == 0.0
    assert all(t.get_data_dtype() == np.float32 for t in tpms) and dseg.get_data_dtype() == np.uint8
    # volumes close to the priors' (GM 1008, WM 670 mL), labels agree with the priors' argmax
    assert map_volume_ml(tpms[0]) == pytest.approx(map_volume_ml(tpl.gm), rel=0.15)
    assert map_volume_ml(tpms[1]) == pytest.approx(map_volume_ml(tpl.wm), rel=0.15)
    prior_labels = tpms_to_dseg([p.get_fdata() for p in tpl.tpms], mask)
    agreement = np.mean(dseg.get_fdata()[mask] == prior_labels[mask])
    assert agreement > 0.8
    # WM is the brightest class and CSF the darkest in a T1w
    t1 = tpl.t1w.get_fdata()
    means = [np.average(t1[mask], weights=p[mask]) for p in stack]
    assert means[1] > means[0] > means[2]
    assert info["warnings"] == [] and info["class_means"]["WM"] > info["class_means"]["GM"]


def test_segment_arguments_are_validated(identity_xfm):
    tpl = get_template(2.0)
    with pytest.raises(ValueError, match="prior_weight"):
        segment_tissues(tpl.t1w, tpl.mask, identity_xfm, prior_weight=2.0)
    with pytest.raises(ValueError, match="iterations"):
        segment_tissues(tpl.t1w, tpl.mask, identity_xfm, iterations=0)
    with pytest.raises(TypeError, match="random_seed"):
        segment_tissues(tpl.t1w, tpl.mask, identity_xfm, random_seed=1.5)


def test_segmentation_repeats_exactly(identity_xfm):
    tpl = get_template(3.0)  # coarse, to keep the test short
    first, *_ = segment_tissues(tpl.t1w, tpl.mask, identity_xfm, resolution_mm=3.0, omp_nthreads=2)
    second, *_ = segment_tissues(tpl.t1w, tpl.mask, identity_xfm, resolution_mm=3.0, omp_nthreads=2)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())


def test_inverted_contrast_is_flagged(identity_xfm):
    """Infant-like contrast (WM darker than GM): the maps come with a warning."""
    tpl = get_template(3.0)
    mask = tpl.mask.get_fdata() > 0
    inverted = np.where(mask, 1.2 - tpl.t1w.get_fdata(), 0.0)
    _, _, info = segment_tissues(new_image(inverted, tpl.affine), tpl.mask, identity_xfm, resolution_mm=3.0,
                                 omp_nthreads=2)
    assert info["class_means"]["WM"] < info["class_means"]["GM"]
    assert any("weak or inverted grey/white contrast" in w for w in info["warnings"])


def test_contrast_free_image_is_refused_cleanly(identity_xfm):
    """No tissue contrast at all: Atropos loses a class; the error says what is wrong."""
    tpl = get_template(3.0)
    mask = tpl.mask.get_fdata() > 0
    t1 = tpl.t1w.get_fdata()
    flat = np.where(mask, 0.5 + 0.02 * (t1 - t1[mask].mean()), 0.0)
    with pytest.raises(ImageError, match="tissue segmentation failed.*grey/white contrast"):
        segment_tissues(new_image(flat, tpl.affine), tpl.mask, identity_xfm, resolution_mm=3.0, omp_nthreads=2)
