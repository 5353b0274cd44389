"""The anatomical preprocessing workflow: its contract, and a full run on one real IXI scan."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from bidsapp.workflows.anatomical import OUTPUT_FIELDS, init_anat_preproc_wf

REPO = Path(__file__).resolve().parents[2]


def _ixi_t1w() -> Path:
    root = Path(os.environ.get("BRAINAGE_SHARED_DATA", REPO / ".." / "shared" / "data")) / "ixi-hh"
    path = root / "sub-IXI012" / "anat" / "sub-IXI012_T1w.nii.gz"
    if not path.is_file():
        pytest.skip(f"real IXI data not found at {root} (set BRAINAGE_SHARED_DATA or place ../shared/data "
                    "beside the checkout)")
    return path


def test_outputnode_matches_the_derivatives_sink():
    from bidsapp.interfaces.bids import RESULT_FIELDS

    wf = init_anat_preproc_wf(omp_nthreads=2, random_seed=7, vbm_fwhm=4.0)
    assert set(OUTPUT_FIELDS) == set(RESULT_FIELDS)
    outputnode = wf.get_node("outputnode")
    assert set(outputnode.outputs.copyable_trait_names()) == set(OUTPUT_FIELDS)
    connected = {dest for _, _, data in wf._graph.in_edges(outputnode, data=True)
                 for _, dest in data["connect"]}
    assert connected == set(OUTPUT_FIELDS)


def test_smoothed_outputs_only_with_vbm_fwhm():
    wf = init_anat_preproc_wf()
    outputnode = wf.get_node("outputnode")
    connected = {dest for _, _, data in wf._graph.in_edges(outputnode, data=True) for _, dest in data["connect"]}
    assert connected == set(OUTPUT_FIELDS) - {"std_mod_tpms_res2_smooth", "std_mod_tpms_res1p5_smooth"}


def test_threads_seed_and_memory_reach_the_nodes():
    wf = init_anat_preproc_wf(omp_nthreads=3, random_seed=11, vbm_fwhm=6.0, name="custom_wf")
    assert wf.name == "custom_wf"
    for name in ("brain_extraction", "bias_correction", "registration", "segmentation", "template_maps"):
        node = wf.get_node(name)
        assert node.n_procs == 3 and node.inputs.omp_nthreads == 3 and node.mem_gb >= 1.0
    assert wf.get_node("registration").inputs.random_seed == 11
    assert wf.get_node("segmentation").inputs.random_seed == 11
    assert wf.get_node("template_maps").inputs.fwhm == 6.0


def test_methods_text_cites_the_tools_and_names_the_template_honestly():
    desc = init_anat_preproc_wf(random_seed=5, vbm_fwhm=4.0).__desc__
    for needle in ("N4", "Tustison", "deepbet", "Fisch", "Atropos", "ANTs", "Avants", "SyN",
                   "MNI152NLin2009aSym", "symmetric", "Fonov", "random seed 5", "4 mm FWHM", "Jacobian"):
        assert needle in desc
    assert "2009c" not in desc and "Asym" not in desc


@pytest.mark.parametrize("kwargs, error", [
    (dict(omp_nthreads=0), ValueError), (dict(omp_nthreads=1.5), TypeError), (dict(random_seed=-1), ValueError),
    (dict(vbm_fwhm=0), ValueError), (dict(vbm_fwhm="4"), ValueError), (dict(name="has space"), ValueError)])
def test_invalid_parameters_are_refused(kwargs, error):
    with pytest.raises(error):
        init_anat_preproc_wf(**kwargs)


def _outputs(wf, graph):
    """outputnode's fields, read from the nodes feeding it (nipype drops identity nodes when running)."""
    results = {node.name: node.result.outputs for node in graph.nodes()}
    outputnode = wf.get_node("outputnode")
    fields = {}
    for src, _, data in wf._graph.in_edges(outputnode, data=True):
        for src_field, dest in data["connect"]:
            fields[dest] = getattr(results[src.name], src_field)
    return SimpleNamespace(**fields)


@pytest.mark.slow
def test_full_run_on_a_real_ixi_scan(tmp_path):
    """One 2 mm IXI adult end to end: plausible volumes, tissue volume conserved by modulation."""
    t1w = _ixi_t1w()
    wf = init_anat_preproc_wf(omp_nthreads=2, random_seed=0, vbm_fwhm=4.0)
    wf.base_dir = str(tmp_path / "work")
    wf.inputs.inputnode.t1w = str(t1w)
    graph = wf.run(plugin="Linear")
    out = _outputs(wf, graph)

    qc = json.loads(Path(out.qc).read_text())
    assert 900 <= qc["mask_volume_ml"] <= 2000
    assert 500 <= qc["gm_volume_ml"] <= 850
    assert 400 <= qc["wm_volume_ml"] <= 700
    assert 100 <= qc["csf_volume_ml"] <= 600
    assert qc["registration_similarity"] > 0.6 and "Pearson" in qc["registration_similarity_metric"]
    assert qc["flags"] == {"skull_stripped_input": False, "thick_slice": False, "anisotropic": False,
                           "oblique": False}
    assert qc["input"]["orientation"] == "PSR" and qc["input"]["voxel_size_mm"] == [2.0, 2.0, 2.0]
    assert set(qc["seconds"]) >= {"load", "brain_extraction", "bias_correction", "registration",
                                  "segmentation", "template_maps", "total"}

    # modulation round trip: template-space totals equal the native tissue volumes
    native = {t: nib.load(p) for t, p in zip(("gm", "wm", "csf"), out.t1w_tpms)}
    vox_ml = np.prod(native["gm"].header.get_zooms()[:3]) / 1000
    for (tissue, res), path in zip([("gm", 2.0), ("wm", 2.0)], out.std_mod_tpms_res2):
        total = nib.load(path).get_fdata().sum() * res**3 / 1000
        assert total == pytest.approx(native[tissue].get_fdata().sum() * vox_ml, rel=0.02)
    for tissue, path in zip(("gm", "wm"), out.std_mod_tpms_res1p5):
        total = nib.load(path).get_fdata().sum() * 1.5**3 / 1000
        assert total == pytest.approx(native[tissue].get_fdata().sum() * vox_ml, rel=0.02)
    assert qc["gm_volume_ml"] == pytest.approx(native["gm"].get_fdata().sum() * vox_ml, rel=1e-3)

    # types and grids of the contract
    preproc = nib.load(out.t1w_preproc)
    assert "".join(nib.aff2axcodes(preproc.affine)) == "RAS" and preproc.get_data_dtype() == np.float32
    assert nib.load(out.t1w_mask).get_data_dtype() == np.uint8
    dseg = nib.load(out.t1w_dseg)
    assert dseg.get_data_dtype() == np.uint8 and set(np.unique(dseg.get_fdata())) == {0, 1, 2, 3}
    assert nib.load(out.std_t1w).shape == (99, 117, 95) and nib.load(out.std_mask).get_data_dtype() == np.uint8
    assert [nib.load(p).shape for p in out.std_mod_tpms_res1p5] == [(131, 155, 126)] * 2
    assert len(out.std_tpms) == 3 and len(out.std_mod_tpms_res2_smooth) == 2
    assert all(str(p).endswith(".nii.gz") for p in [out.t1w_preproc, out.t1w_mask, *out.std_tpms])
    assert str(out.anat2std_xfm).endswith(".h5") and str(out.std2anat_xfm).endswith(".h5")
    # smoothing keeps the total
    smooth_total = nib.load(out.std_mod_tpms_res2_smooth[0]).get_fdata().sum()
    assert smooth_total == pytest.approx(nib.load(out.std_mod_tpms_res2[0]).get_fdata().sum(), rel=0.005)
