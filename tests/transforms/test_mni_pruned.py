"""Seed-002 input preparation: fixed pruning box, uint8 compression, region partition."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from bidsapp.errors import ImageError
from bidsapp.templates import get_template
from bidsapp.transforms.mni_pruned import (MLENS_REGIONS, MNIPrunedSpec, mni_region_masks,
                                           prepare_mni_input, prune, pruning_box,
                                           relevance_to_template, scale_to_uint8,
                                           to_network_input, unprune)


def _brain_image(value=None, seed=0):
    """A brain-masked 'MNI-space T1w' on the 2 mm template grid: the template T1w x 400."""
    tpl = get_template(2.0)
    mask = np.asarray(tpl.mask.dataobj) > 0
    data = tpl.t1w.get_fdata(dtype=np.float32) * 400
    if value is not None:
        data = np.full(mask.shape, float(value), np.float32)
    data += np.random.default_rng(seed).normal(0, 2, mask.shape).astype(np.float32)
    return nib.Nifti1Image(np.where(mask, np.clip(data, 1, None), 0).astype(np.float32), tpl.affine), mask


def test_box_is_the_template_brain_plus_the_margin():
    mask = np.asarray(get_template(2.0).mask.dataobj) > 0
    box = pruning_box(MNIPrunedSpec(margin_voxels=2))
    inside = prune(mask, box)
    assert inside.sum() == mask.sum()  # nothing of the template brain is cut
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        start, stop = box[axis].start, box[axis].stop
        # exactly 2 voxels of margin on each side, unless the grid ends first
        assert start == max(0, hits[0] - 2) and stop == min(mask.shape[axis], hits[-1] + 3)
    wider = pruning_box(MNIPrunedSpec(margin_voxels=4))
    assert all(w.stop - w.start >= b.stop - b.start for w, b in zip(wider, box))


def test_prune_unprune_round_trip():
    rng = np.random.default_rng(0)
    box = pruning_box(MNIPrunedSpec(region="subcortical"))
    shape = get_template(2.0).shape
    full = np.zeros(shape, np.float32)
    full[box] = rng.normal(size=tuple(s.stop - s.start for s in box))
    np.testing.assert_array_equal(unprune(prune(full, box), box, shape), full)
    with pytest.raises(ValueError, match="shape"):
        unprune(np.zeros((2, 2, 2)), box, shape)


def test_uint8_scaling_known_values():
    # x * 255 / 100, clipped at 382.5, times 255 / 382.5
    out = scale_to_uint8(np.array([0.0, 10.0, 100.0, 149.9, 150.0, 1000.0, -5.0]), reference=100.0)
    np.testing.assert_array_equal(out, [0, 17, 170, 255, 255, 255, 0])
    assert out.dtype == np.uint8
    half = scale_to_uint8(np.array([100.0]), reference=100.0, clip_factor=1.0)
    assert half.tolist() == [255]


def test_regions_partition_the_grid():
    masks = mni_region_masks()
    assert set(masks) == set(MLENS_REGIONS)
    parts = [masks[r] for r in ("cortical", "subcortical", "cerebellum")]
    np.testing.assert_array_equal(sum(p.astype(int) for p in parts), np.ones(parts[0].shape, int))
    affine = get_template(2.0).affine
    centre = {r: affine[:3, :3] @ np.argwhere(masks[r]).mean(axis=0) + affine[:3, 3]
              for r in ("subcortical", "cerebellum")}
    # cerebellum: posterior and inferior; deep grey matter near the midline, above it
    assert centre["cerebellum"][1] < -40 and centre["cerebellum"][2] < -20
    assert abs(centre["subcortical"][0]) < 5 and centre["subcortical"][2] > centre["cerebellum"][2] + 20
    mask = np.asarray(get_template(2.0).mask.dataobj) > 0
    volumes = {r: (masks[r] & mask).sum() * 8 / 1000 for r in ("subcortical", "cerebellum")}
    assert 100 < volumes["cerebellum"] < 250 and 50 < volumes["subcortical"] < 250  # mL


def test_prepare_whole_brain_input():
    img, mask = _brain_image()
    spec = MNIPrunedSpec()
    volume = prepare_mni_input(img, spec)
    box = pruning_box(spec)
    assert volume.shape == tuple(s.stop - s.start for s in box) and volume.data.dtype == np.uint8
    # world positions are kept: voxel 0 of the box is the template voxel at the box corner
    corner = get_template(2.0).affine @ np.array([box[0].start, box[1].start, box[2].start, 1.0])
    np.testing.assert_allclose(volume.affine[:, 3], corner)
    # scaling: the 99th brain percentile becomes 255 / 1.5 = 170
    data = img.get_fdata()
    p99 = np.percentile(data[data > 0], 99)
    expected = scale_to_uint8(data[box], reference=p99)
    assert np.abs(volume.data.astype(int) - expected.astype(int)).max() <= 1
    assert np.all(volume.data[~prune(mask, box)] == 0)
    name, params = volume.history[-1]
    assert name == "MNIPruned" and params["signal_outside_box"] == pytest.approx(0.0, abs=1e-6)
    net_input = to_network_input(volume)
    assert net_input.dtype == np.float32 and net_input.max() == float(volume.data.max())


def test_prepare_region_and_coarse_grid():
    img, _ = _brain_image()
    masks = mni_region_masks()
    spec = MNIPrunedSpec(region="cerebellum")
    volume = prepare_mni_input(img, spec)
    outside = prune(~masks["cerebellum"], pruning_box(spec))
    assert np.all(volume.data[outside] == 0) and volume.data.max() > 100
    coarse = prepare_mni_input(img, MNIPrunedSpec(resolution_mm=4.0))
    fine = prepare_mni_input(img, MNIPrunedSpec())
    assert coarse.shape[0] < fine.shape[0] / 1.6
    np.testing.assert_allclose(coarse.zooms, 4.0)
    # anti-aliased downsampling keeps the mean intensity of the brain
    assert float(coarse.data.sum()) * 8 == pytest.approx(float(fine.data.sum()), rel=0.02)


def test_image_off_the_template_grid_is_resampled():
    img, _ = _brain_image()
    moved = nib.Nifti1Image(np.asarray(img.dataobj)[1:, :, :], img.affine.copy())
    moved.affine[0, 3] += 2.0  # same world positions, one voxel fewer
    a = prepare_mni_input(img, MNIPrunedSpec(resolution_mm=4.0))
    b = prepare_mni_input(moved, MNIPrunedSpec(resolution_mm=4.0))
    assert np.abs(a.data.astype(int) - b.data.astype(int)).mean() < 1.0


def test_empty_image_is_refused():
    img, _ = _brain_image(value=0.0)
    empty = nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine)
    with pytest.raises(ImageError, match="no brain voxel"):
        prepare_mni_input(empty, MNIPrunedSpec())


def test_relevance_goes_back_to_the_template_grid_with_its_sum():
    rng = np.random.default_rng(1)
    for spec in (MNIPrunedSpec(), MNIPrunedSpec(resolution_mm=4.0, region="cortical")):
        box = pruning_box(spec)
        rel = np.zeros(tuple(s.stop - s.start for s in box), np.float32)
        inner = tuple(slice(3, n - 3) for n in rel.shape)
        rel[inner] = rng.normal(0, 1, rel[inner].shape) + 0.5
        img = relevance_to_template(rel, spec)
        assert img.shape == get_template(2.0).shape
        np.testing.assert_allclose(img.affine, get_template(2.0).affine)
        total = img.get_fdata().sum()
        assert total == pytest.approx(rel.sum(), rel=1e-4 if spec.resolution_mm == 2 else 0.02)


@pytest.mark.parametrize("kwargs, match", [
    (dict(resolution_mm=1.0), "resolution_mm"), (dict(region="frontal"), "region"),
    (dict(margin_voxels=-1), "margin_voxels"), (dict(clip_factor=0.5), "clip_factor"),
    (dict(reference_percentile=20), "reference_percentile"),
])
def test_invalid_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MNIPrunedSpec(**kwargs)
    with pytest.raises(ValueError, match="unknown input parameter"):
        MNIPrunedSpec.from_dict({"spacing": 2})
