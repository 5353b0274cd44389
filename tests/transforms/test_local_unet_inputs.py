"""Seed-000 inputs: smoothed modulated GM/WM on the template grid, training blocks, tiling."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from bidsapp.errors import InputMissingError
from bidsapp.inference.local_unet import tiled_age_map
from bidsapp.nets import LocalUNet
from bidsapp.templates import get_template
from bidsapp.transforms.blocks import (block_margin, crop_padded, sample_block, tile_coverage,
                                       tile_origins, tile_predict)
from bidsapp.transforms.modulated import (ModulatedInputSpec, brain_box, brain_mask,
                                          modulated_paths, prepare_modulated_input, smooth_fwhm,
                                          to_template_grid)


def test_smoothing_has_the_requested_fwhm_and_keeps_the_total():
    delta = np.zeros((31, 31, 31), np.float32)
    delta[15, 15, 15] = 1.0
    out = smooth_fwhm(delta, 4.0, 1.0)
    assert out.sum() == pytest.approx(1.0, abs=1e-4)
    x = np.arange(31) - 15.0
    for axis in range(3):
        profile = out.sum(axis=tuple(a for a in range(3) if a != axis))
        sd = np.sqrt(np.sum(profile * x ** 2))
        assert sd * 2 * np.sqrt(2 * np.log(2)) == pytest.approx(4.0, abs=0.01)
    assert np.array_equal(smooth_fwhm(delta, 0.0, 1.0), delta)


def test_spec_validation_and_source_grid():
    assert ModulatedInputSpec().source_resolution_mm == 1.5
    assert ModulatedInputSpec(resolution_mm=3).source_resolution_mm == 2.0
    for bad in (1.0, 1.75, 9.0, True):
        with pytest.raises(ValueError, match="resolution_mm"):
            ModulatedInputSpec(resolution_mm=bad)
    with pytest.raises(ValueError, match="unknown input parameter"):
        ModulatedInputSpec.from_dict({"resolution_mm": 2.0, "shape": [1, 2, 3]})


def _write_maps(folder, prefix, gm, wm, res="2"):
    affine = get_template(2.0 if res == "2" else 1.5).affine
    paths = []
    for tissue, data in (("GM", gm), ("WM", wm)):
        path = folder / (f"{prefix}_space-MNI152NLin2009aSym_res-{res}_label-{tissue}_"
                         "desc-modulated_probseg.nii.gz")
        nib.Nifti1Image(data.astype(np.float32), affine).to_filename(path)
        paths.append(path)
    return paths


def test_prepared_input_round_trip_and_smoothing(tmp_path):
    tpl = get_template(2.0)
    gm = tpl.gm.get_fdata(dtype=np.float32) * 0.8
    wm = tpl.wm.get_fdata(dtype=np.float32) * 0.9
    written = _write_maps(tmp_path, "sub-01", gm, wm)
    spec = ModulatedInputSpec(resolution_mm=2.0)
    assert list(modulated_paths(tmp_path, "sub-01", spec)) == written
    with pytest.raises(InputMissingError, match="res-1p5"):
        modulated_paths(tmp_path, "sub-01", ModulatedInputSpec(resolution_mm=1.5))
    raw = prepare_modulated_input(written, ModulatedInputSpec(resolution_mm=2.0, fwhm_mm=0.0))
    box = brain_box(spec)
    assert raw.data.shape == (2, 73, 90, 78) and raw.mask.shape == (73, 90, 78)
    np.testing.assert_array_equal(raw.data[0], gm[box])  # no smoothing: the maps, cropped
    np.testing.assert_array_equal(raw.mask, np.asarray(tpl.mask.dataobj)[box] > 0)
    # the box's affine puts voxel 0 where the template grid has voxel box.start
    np.testing.assert_allclose(raw.affine[:3, 3], tpl.affine[:3, 3] + 2.0 * np.array(
        [s.start for s in box]))
    smooth = prepare_modulated_input(written, spec)
    assert smooth.data[0].sum() == pytest.approx(gm.sum(), rel=0.01)  # tissue volume kept
    assert smooth.data[0].max() < raw.data[0].max()
    coarse = prepare_modulated_input(written, ModulatedInputSpec(resolution_mm=4.0))
    # 8 times larger voxels: 1/8 of the sum, the same volume
    assert coarse.data[1].sum() * 8 == pytest.approx(wm.sum(), rel=0.02)
    assert coarse.mask.shape == tuple(s.stop - s.start for s in brain_box(
        ModulatedInputSpec(resolution_mm=4.0)))


def test_maps_go_back_to_the_two_mm_grid():
    spec = ModulatedInputSpec(resolution_mm=3.0)
    mask = brain_mask(spec)
    values = np.where(mask, 42.0, np.nan).astype(np.float32)
    img = to_template_grid(values, spec, 2.0)
    target = get_template(2.0)
    assert img.shape == target.shape and np.allclose(img.affine, target.affine)
    data = np.asarray(img.dataobj)
    inside = np.asarray(target.mask.dataobj) > 0
    assert np.all(np.isnan(data[~inside]))
    # normalised interpolation: a constant stays exactly constant up to the mask's edge
    assert np.nanmax(np.abs(data[inside] - 42.0)) < 1e-4
    assert np.isfinite(data[inside]).mean() > 0.97
    same = to_template_grid(np.where(brain_mask(ModulatedInputSpec(resolution_mm=2.0)), 1.0,
                                     np.nan), ModulatedInputSpec(resolution_mm=2.0))
    assert np.array_equal(np.isfinite(np.asarray(same.dataobj)), inside)


def test_crop_padded_and_block_sampling():
    data = np.arange(2 * 6 * 7 * 8, dtype=np.float32).reshape(2, 6, 7, 8)
    block = crop_padded(data, (-2, 3, 5), 4)
    assert block.shape == (2, 4, 4, 4)
    np.testing.assert_array_equal(block[:, 2:, :, :3], data[:, 0:2, 3:7, 5:8])
    assert np.all(block[:, :2] == 0) and np.all(block[:, :, :, 3:] == 0)
    assert np.all(crop_padded(data, (10, 0, 0), 3) == 0)
    mask = np.zeros((6, 7, 8), bool)
    mask[4, 2, 6] = True  # one brain voxel: the output block is centred on it
    x, target, origin = sample_block(data, mask, np.random.default_rng(0), 8, 4)
    assert origin.tolist() == [2, 0, 4] and block_margin(8, 4) == 2
    np.testing.assert_array_equal(x, crop_padded(data, origin - 2, 8))
    assert target.sum() == 1 and target[2, 2, 2]
    with pytest.raises(ValueError, match="even"):
        block_margin(9, 4)


def test_tiles_cover_every_mask_voxel():
    rng = np.random.default_rng(1)
    mask = np.zeros((40, 33, 29), bool)
    mask[3:36, 5:30, 2:27] = rng.random((33, 25, 25)) > 0.3
    for stride in (6, 4, 1):
        origins = tile_origins(mask, 6, stride)
        count = tile_coverage(mask, origins, 6)
        assert count[mask].min() >= 1
        # every block holds brain, and without overlap there are no more than needed
        assert all(crop_padded(mask, o, 6).any() for o in origins)
    exact = np.zeros((30, 24, 18), bool)
    exact[6:24, 0:12, 6:18] = True  # extents 18, 12, 12: multiples of the output block
    origins = tile_origins(exact, 6)
    count = tile_coverage(exact, origins, 6)
    assert len(origins) == 3 * 2 * 2 and np.all(count[exact] == 1) and np.all(count[~exact] == 0)
    with pytest.raises(ValueError, match="stride"):
        tile_origins(exact, 6, 7)


def test_overlapping_tiles_are_averaged():
    mask = np.zeros((20, 20, 20), bool)
    mask[2:18, 2:18, 2:18] = True
    data = np.zeros((1, 20, 20, 20), np.float32)
    seen = []

    def predict(x):  # each block's output is the running number of the block
        seen.extend(range(len(seen), len(seen) + len(x)))
        return np.stack([np.full((6, 6, 6), i, np.float32) for i in seen[-len(x):]])

    out = tile_predict(predict, data, mask, 10, 6, stride=3, batch_size=5)
    origins = tile_origins(mask, 6, 3)
    total = np.zeros(mask.shape)
    for i, o in enumerate(origins):
        total[tuple(slice(a, a + 6) for a in o)] += i
    expected = total / np.maximum(tile_coverage(mask, origins, 6), 1)
    np.testing.assert_allclose(out[mask], expected[mask], rtol=1e-6)
    assert np.all(np.isnan(out[~mask]))


def test_tiled_map_reproduces_the_block_predictions():
    torch.manual_seed(0)
    net = LocalUNet(init_channels=2, depth=2, convs_per_scale=1).eval()  # 30 -> 10
    torch.nn.init.normal_(net.output.weight)
    net.set_target_scaling(50.0, 10.0)
    rng = np.random.default_rng(2)
    data = rng.random((2, 24, 26, 22)).astype(np.float32)
    mask = np.zeros((24, 26, 22), bool)
    mask[2:22, 3:23, 1:21] = True  # extents 20: two blocks per axis, no overlap
    age_map = tiled_age_map(net, data, mask, 30, 10)
    margin = block_margin(30, 10)
    with torch.no_grad():
        for origin in tile_origins(mask, 10):
            x = crop_padded(data, origin - margin, 30)[None]
            block = net(torch.from_numpy(x)).numpy()[0, 0]
            region = tuple(slice(a, a + 10) for a in origin)
            np.testing.assert_allclose(age_map[region], block, rtol=1e-5)
    assert np.isfinite(age_map[mask]).all() and np.isnan(age_map[~mask]).all()
    assert np.nanstd(age_map) > 0
