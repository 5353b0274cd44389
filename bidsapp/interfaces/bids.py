"""Derivatives sink: the nipype node that hands a T1w's results to :mod:`bidsapp.derivatives`."""

from __future__ import annotations

import json
from pathlib import Path

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject, SimpleInterface,
                                    Str, TraitedSpec, traits)

from nipype.interfaces.base import isdefined

from ..derivatives import SourceEntities, write_anat_derivatives, write_model_derivatives

__all__ = ["AnatDerivativesSink", "BrainAgeSink", "RESULT_FIELDS"]

#: Fields of the preprocessing workflow's outputnode that the sink writes.
RESULT_FIELDS = ("t1w_preproc", "t1w_mask", "t1w_dseg", "t1w_tpms", "anat2std_xfm", "std2anat_xfm",
                 "std_t1w", "std_mask", "std_tpms", "std_mod_tpms_res2", "std_mod_tpms_res1p5",
                 "std_mod_tpms_res2_smooth", "std_mod_tpms_res1p5_smooth", "qc")


class _AnatDerivativesSinkInputSpec(BaseInterfaceInputSpec):
    base_directory = Str(mandatory=True, desc="root of the derivatives dataset")
    source_file = File(exists=True, mandatory=True, desc="the raw T1w these results come from")
    relpath = Str(mandatory=True, desc="source path relative to the raw dataset")
    scan_info = Str("{}", usedefault=True, desc="JSON of the age/sex/site lookup, added to the QC file")
    vbm_fwhm = traits.Either(None, traits.Float, usedefault=True, desc="FWHM of smoothed VBM maps")
    t1w_preproc = File(exists=True, mandatory=True, desc="native N4-corrected T1w")
    t1w_mask = File(exists=True, mandatory=True, desc="native brain mask")
    t1w_dseg = File(exists=True, mandatory=True, desc="native tissue labels")
    t1w_tpms = InputMultiObject(File(exists=True), mandatory=True, desc="native GM, WM, CSF probsegs")
    anat2std_xfm = File(exists=True, mandatory=True, desc="T1w to template composite transform")
    std2anat_xfm = File(exists=True, mandatory=True, desc="template to T1w composite transform")
    std_t1w = File(exists=True, mandatory=True, desc="brain-masked T1w in template space (2 mm)")
    std_mask = File(exists=True, mandatory=True, desc="brain mask in template space (2 mm)")
    std_tpms = InputMultiObject(File(exists=True), mandatory=True, desc="template-space probsegs (2 mm)")
    std_mod_tpms_res2 = InputMultiObject(File(exists=True), mandatory=True, desc="modulated GM, WM (2 mm)")
    std_mod_tpms_res1p5 = InputMultiObject(File(exists=True), mandatory=True,
                                           desc="modulated GM, WM (1.5 mm)")
    std_mod_tpms_res2_smooth = InputMultiObject(File(exists=True), desc="smoothed modulated (2 mm)")
    std_mod_tpms_res1p5_smooth = InputMultiObject(File(exists=True), desc="smoothed modulated (1.5 mm)")
    qc = File(exists=True, mandatory=True, desc="QC metrics JSON")


class _AnatDerivativesSinkOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True), desc="every derivative written")


class AnatDerivativesSink(SimpleInterface):
    """Write all anatomical derivatives of one T1w at once, atomically file by file.

    It runs only when every upstream node succeeded, so a failed T1w leaves no partial set
    of preprocessing derivatives behind.
    """

    input_spec = _AnatDerivativesSinkInputSpec
    output_spec = _AnatDerivativesSinkOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        outputs = {name: getattr(inputs, name) for name in RESULT_FIELDS
                   if isdefined(getattr(inputs, name))}
        written = write_anat_derivatives(
            inputs.base_directory, SourceEntities.from_path(inputs.source_file), inputs.relpath,
            outputs, extra_qc={"scan_info": json.loads(inputs.scan_info)},
            vbm_fwhm=inputs.vbm_fwhm)
        self._results["out_files"] = [str(p) for p in written]
        return runtime


class _BrainAgeSinkInputSpec(BaseInterfaceInputSpec):
    base_directory = Str(mandatory=True, desc="root of the derivatives dataset")
    source_file = File(exists=True, mandatory=True, desc="the raw T1w these results come from")
    relpath = Str(mandatory=True, desc="source path relative to the raw dataset")
    scan_info = Str("{}", usedefault=True, desc="JSON of the age/sex/site lookup")
    predictions = InputMultiObject(File(exists=True), mandatory=True,
                                   desc="prediction JSON of each model interface")


class BrainAgeSink(SimpleInterface):
    """Write one T1w's ``_brainage.tsv`` and the models' maps once every model has run."""

    input_spec = _BrainAgeSinkInputSpec
    output_spec = _AnatDerivativesSinkOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        predictions = [json.loads(Path(p).read_text(encoding="utf-8")) for p in inputs.predictions]
        written = write_model_derivatives(
            inputs.base_directory, SourceEntities.from_path(inputs.source_file), inputs.relpath,
            predictions, age=json.loads(inputs.scan_info).get("age"))
        self._results["out_files"] = [str(p) for p in written]
        return runtime
