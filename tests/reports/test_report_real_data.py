"""The report on a real IXI scan (native 'PSR'-like orientation, with face), via a quick stand-in.

The derivatives here come from a crude stand-in (threshold mask, intensity tertiles, template
grid resampling without registration), not from the brainage workflow: the test checks that
the report copes with real image geometry and sizes, not the quality of preprocessing.
"""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
from nilearn import datasets, image
from scipy import ndimage

from bidsapp.derivatives import TEMPLATE_SPACE, SourceEntities, derivative_path
from bidsapp.reports import generate_participant_report
from bidsapp.reports.figures import cuts_from_mask


def _stand_in(t1w_path, out):
    src = SourceEntities.from_path(t1w_path)
    img = nib.load(t1w_path)
    data = img.get_fdata(dtype=np.float32)
    head = ndimage.binary_fill_holes(data > np.percentile(data[data > 0], 60))
    labels, n = ndimage.label(ndimage.binary_erosion(head, iterations=3))
    sizes = ndimage.sum(np.ones_like(labels), labels, range(1, n + 1))
    mask = (labels == 1 + int(np.argmax(sizes))).astype(np.uint8)
    cut1, cut2 = np.percentile(data[mask > 0], [33, 66])
    dseg = np.where(data < cut1, 3, np.where(data < cut2, 1, 2)).astype(np.uint8) * mask
    save = lambda arr, **kw: nib.Nifti1Image(arr, img.affine).to_filename(  # noqa: E731
        derivative_path(out, src, **kw))
    derivative_path(out, src, suffix="T1w").parent.mkdir(parents=True)
    save(data, suffix="T1w", desc="preproc")
    save(mask, suffix="mask", desc="brain")
    save(dseg, suffix="dseg")
    tpl = datasets.load_mni152_template(resolution=2)
    warped = image.resample_to_img(img, tpl, force_resample=True, copy_header=True)
    nib.Nifti1Image(warped.get_fdata(dtype=np.float32), tpl.affine).to_filename(
        derivative_path(out, src, suffix="T1w", desc="preproc", space=TEMPLATE_SPACE, res="2"))
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
    qc = {"mask_volume_ml": float(mask.sum()) * voxel_ml,
          "gm_volume_ml": float((dseg == 1).sum()) * voxel_ml, "warnings": []}
    derivative_path(out, src, suffix="qc", extension=".json").write_text(json.dumps(qc))
    return src, qc, mask, img.affine


def test_report_on_real_ixi_scan(ixi_dir, tmp_path):
    t1w = sorted(ixi_dir.glob("sub-*/anat/sub-*_T1w.nii.gz"))[0]
    src, qc, mask, affine = _stand_in(t1w, tmp_path)
    # Every cut of the mosaics passes through the mask, despite the permuted native axes.
    ijk = np.argwhere(mask > 0)
    xyz = nib.affines.apply_affine(affine, ijk)
    for axis, coords in cuts_from_mask(nib.Nifti1Image(mask, affine)).items():
        column = "xyz".index(axis)
        for c in coords:
            assert np.any(np.abs(xyz[:, column] - c) <= 1.0), (axis, c)
    path = generate_participant_report(tmp_path, src.subject, run_uuid="real-data-check")
    text = path.read_text(encoding="utf-8")
    assert f"{qc['mask_volume_ml']:,.1f}" in text and f"{qc['gm_volume_ml']:,.1f}" in text
    sources = re.findall(r'<img[^>]* src="([^"]+)"', text)
    assert len(sources) == 4  # brain mask, segmentation, registration (+ template view)
    for rel in sources:
        figure = tmp_path / rel
        assert figure.is_file() and 10_000 < figure.stat().st_size < 1_100_000
    assert "could not be drawn" not in text
