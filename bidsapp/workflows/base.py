"""Top-level participant workflow: one sub-workflow per T1w (each session, acquisition, run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from nipype.pipeline import engine as pe

from .. import __version__
from ..bids.layout import T1wUnit
from ..interfaces.bids import RESULT_FIELDS, AnatDerivativesSink, BrainAgeSink

__all__ = ["init_brainage_wf", "init_single_t1w_wf", "workflow_name"]


def workflow_name() -> str:
    """Name of the top workflow; caches in the work dir never cross minor versions."""
    major, minor = __version__.split(".")[:2]
    return f"brainage_{major}_{minor}_wf"


def init_single_t1w_wf(*, unit: T1wUnit, output_dir: Path, omp_nthreads: int = 1,
                       random_seed: int = 0, vbm_fwhm: float | None = None,
                       models: Sequence[str] = (), device: str = "cpu",
                       cbv_model: Path | None = None,
                       ddim_steps: int | None = None) -> pe.Workflow:
    """Preprocess one T1w, run the brain-age models on it and write its derivatives.

    Parameters
    ----------
    unit : T1wUnit
        The T1w image, its entities and phenotype.
    output_dir : Path
        Root of the derivatives dataset.
    omp_nthreads : int
        Threads per process.
    random_seed : int
        Seed for ANTs, deepbet and the Monte-Carlo dropout masks of ``diffusion-ae``.
    vbm_fwhm : float, optional
        Also write smoothed modulated tissue maps with this FWHM (mm).
    models : sequence of str
        Model ids to run (empty: preprocessing only).
    device : str
        Torch device of the models.
    cbv_model : Path, optional
        CBV synthesis checkpoint for the CBV branch of ``vgg-cbv`` (``--cbv-model``).
    ddim_steps : int, optional
        DDIM steps of the ``diffusion-ae`` reconstruction (``--ddim-steps``; default: the
        model card's).

    Returns
    -------
    Workflow
        Named ``sub_<l>[_ses_<l>]..._wf``.
    """
    from .anatomical import init_anat_preproc_wf

    workflow = pe.Workflow(name=f"{unit.source.unit_id}_wf")
    anat_wf = init_anat_preproc_wf(omp_nthreads=omp_nthreads, random_seed=random_seed,
                                   vbm_fwhm=vbm_fwhm)
    anat_wf.inputs.inputnode.t1w = str(unit.path)
    sink = pe.Node(AnatDerivativesSink(base_directory=str(output_dir), source_file=str(unit.path),
                                       relpath=unit.relpath, scan_info=json.dumps(unit.info.as_dict()),
                                       vbm_fwhm=vbm_fwhm),
                   name="ds_anat", run_without_submitting=True, overwrite=True)
    fields = [f for f in RESULT_FIELDS if vbm_fwhm or not f.endswith("_smooth")]
    workflow.connect([(anat_wf, sink, [(f"outputnode.{f}", f) for f in fields])])
    workflow.__desc__ = getattr(anat_wf, "__desc__", "")
    if [m for m in models if m != "ensemble"]:
        from .models import MODEL_INPUT_FIELDS, init_models_wf

        models_wf = init_models_wf(models=models, device=device, omp_nthreads=omp_nthreads,
                                   age=unit.info.age, sex=unit.info.sex, cbv_model=cbv_model,
                                   ddim_steps=ddim_steps, random_seed=random_seed)
        # a separate sink: a failing model must not withhold the preprocessing derivatives
        ds_brainage = pe.Node(BrainAgeSink(base_directory=str(output_dir), source_file=str(unit.path),
                                           relpath=unit.relpath,
                                           scan_info=json.dumps(unit.info.as_dict())),
                              name="ds_brainage", run_without_submitting=True, overwrite=True)
        workflow.connect([
            (anat_wf, models_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in MODEL_INPUT_FIELDS]),
            (models_wf, ds_brainage, [("outputnode.predictions", "predictions")]),
        ])
    return workflow


def init_brainage_wf(*, units: Sequence[T1wUnit], output_dir: Path, work_dir: Path,
                     omp_nthreads: int = 1, random_seed: int = 0,
                     vbm_fwhm: float | None = None, models: Sequence[str] = (),
                     device: str = "cpu", cbv_model: Path | None = None,
                     ddim_steps: int | None = None) -> pe.Workflow:
    """The participant-level workflow over all selected T1w images.

    Parameters
    ----------
    units : sequence of T1wUnit
        T1w images to process.
    output_dir, work_dir : Path
        Derivatives root and nipype cache root.
    omp_nthreads, random_seed, vbm_fwhm, models, device, cbv_model, ddim_steps
        See :func:`init_single_t1w_wf`.
    """
    workflow = pe.Workflow(name=workflow_name(), base_dir=str(work_dir))
    for unit in units:
        workflow.add_nodes([init_single_t1w_wf(unit=unit, output_dir=output_dir,
                                               omp_nthreads=omp_nthreads, random_seed=random_seed,
                                               vbm_fwhm=vbm_fwhm, models=models,
                                               device=device, cbv_model=cbv_model,
                                               ddim_steps=ddim_steps)])
    return workflow
