"""Nipype interfaces wrapping the anatomical preprocessing stages of :mod:`bidsapp.anat`.

Each interface is a thin shell: it reads its input files, calls one :mod:`bidsapp.anat` function,
writes gzipped NIfTI (float32 images, uint8 masks/labels) into the node's working directory and a
small JSON report (stage name, wall seconds, stage-specific numbers) that :class:`AnatQC` merges.
All inputs are files or plain values, so nipype's hashing reuses finished stages on a rerun.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject, OutputMultiObject,
                                    SimpleInterface, TraitedSpec, isdefined, traits)

__all__ = [
    "LoadT1w",
    "BrainExtraction",
    "BiasFieldCorrection",
    "TemplateRegistration",
    "TissueSegmentation",
    "TemplateTissueMaps",
    "AnatQC",
]


def _clock() -> tuple[float, float]:
    """Wall time and this process's CPU time (all threads: user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime + usage.ru_stime


def _report(cwd: str, stage: str, started: tuple[float, float], **content) -> str:
    from ..anat.qc import write_json

    wall, cpu = _clock()
    path = Path(cwd) / f"report_{stage}.json"
    write_json(path, {"stage": stage, "seconds": round(wall - started[0], 3),
                      "cpu_seconds": round(cpu - started[1], 3), **content})
    return str(path)


def _save(img: nib.Nifti1Image, cwd: str, name: str) -> str:
    path = Path(cwd) / f"{name}.nii.gz"
    img.to_filename(path)
    return str(path)


# --------------------------------------------------------------------------------------------------
class _LoadT1wInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="raw T1w NIfTI (any orientation)")


class _LoadT1wOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="T1w reoriented to RAS, float32, non-finite voxels set to 0")
    out_report = File(exists=True, desc="JSON: input inspection (shape, voxel size, flags, warnings)")


class LoadT1w(SimpleInterface):
    """Check a T1w (refusing unusable inputs with ImageError) and reorient it to RAS."""

    input_spec = _LoadT1wInputSpec
    output_spec = _LoadT1wOutputSpec

    def _run_interface(self, runtime):
        from ..anat.checks import load_t1w

        started = _clock()
        img, info = load_t1w(self.inputs.in_file)
        self._results["out_file"] = _save(img, runtime.cwd, "t1w_ras")
        self._results["out_report"] = _report(runtime.cwd, "load", started, inspection=info.as_dict())
        return runtime


# --------------------------------------------------------------------------------------------------
class _BrainExtractionInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="RAS T1w")
    omp_nthreads = traits.Int(1, usedefault=True, desc="torch CPU threads")
    use_gpu = traits.Bool(False, usedefault=True, desc="let deepbet use CUDA/MPS when available")


class _BrainExtractionOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="uint8 brain mask")
    out_report = File(exists=True, desc="JSON: mask volume, skull-stripped-input decision, warnings")


class BrainExtraction(SimpleInterface):
    """deepbet brain mask (or the foreground of an already skull-stripped input)."""

    input_spec = _BrainExtractionInputSpec
    output_spec = _BrainExtractionOutputSpec

    def _run_interface(self, runtime):
        from ..anat.brainmask import extract_brain

        started = _clock()
        mask, info = extract_brain(nib.load(self.inputs.in_file), omp_nthreads=self.inputs.omp_nthreads,
                                   use_gpu=self.inputs.use_gpu)
        self._results["out_mask"] = _save(mask, runtime.cwd, "brain_mask")
        self._results["out_report"] = _report(runtime.cwd, "brain_extraction", started, brainmask=info)
        return runtime


# --------------------------------------------------------------------------------------------------
class _BiasFieldCorrectionInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="RAS T1w")
    in_mask = File(exists=True, mandatory=True, desc="brain mask the field is fitted in")
    omp_nthreads = traits.Int(1, usedefault=True, desc="ITK threads")


class _BiasFieldCorrectionOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="N4-corrected T1w (native grid, unmasked)")
    out_field = File(exists=True, desc="multiplicative bias field (in = out_file * out_field)")
    out_report = File(exists=True, desc="JSON: seconds")


class BiasFieldCorrection(SimpleInterface):
    """N4 bias field estimated on the 2 mm working grid, applied at full resolution."""

    input_spec = _BiasFieldCorrectionInputSpec
    output_spec = _BiasFieldCorrectionOutputSpec

    def _run_interface(self, runtime):
        from ..anat.bias import n4_correct

        started = _clock()
        corrected, field = n4_correct(nib.load(self.inputs.in_file), nib.load(self.inputs.in_mask),
                                      omp_nthreads=self.inputs.omp_nthreads)
        self._results["out_file"] = _save(corrected, runtime.cwd, "t1w_preproc")
        self._results["out_field"] = _save(field, runtime.cwd, "bias_field")
        self._results["out_report"] = _report(runtime.cwd, "bias_correction", started)
        return runtime


# --------------------------------------------------------------------------------------------------
class _TemplateRegistrationInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="N4-corrected T1w")
    in_mask = File(exists=True, mandatory=True, desc="brain mask")
    random_seed = traits.Int(0, usedefault=True, desc="seed of ANTs' sampling")
    omp_nthreads = traits.Int(1, usedefault=True, desc="ITK threads")


class _TemplateRegistrationOutputSpec(TraitedSpec):
    anat2std_xfm = File(exists=True, desc="T1w-to-template composite transform (.h5)")
    std2anat_xfm = File(exists=True, desc="template-to-T1w composite transform (.h5)")
    std_t1w = File(exists=True, desc="brain-masked T1w on the 2 mm template grid")
    std_mask = File(exists=True, desc="brain mask on the 2 mm template grid (uint8)")
    out_report = File(exists=True, desc="JSON: registration similarity and its definition")


class TemplateRegistration(SimpleInterface):
    """ANTs affine + SyN registration to MNI152NLin2009aSym, and the T1w and mask resampled there."""

    input_spec = _TemplateRegistrationInputSpec
    output_spec = _TemplateRegistrationOutputSpec

    def _run_interface(self, runtime):
        from ..anat.grid import new_image
        from ..anat.register import (SIMILARITY_METRIC, apply_transform, register_to_template,
                                     registration_similarity)
        from ..templates import TEMPLATE_SPACE, get_template

        started = _clock()
        t1w, mask = nib.load(self.inputs.in_file), nib.load(self.inputs.in_mask)
        nthreads = self.inputs.omp_nthreads
        anat2std, std2anat = register_to_template(t1w, mask, runtime.cwd, random_seed=self.inputs.random_seed,
                                                  omp_nthreads=nthreads)
        template = get_template(2.0)
        inside = np.asarray(mask.dataobj) > 0
        brain = new_image(np.where(inside, np.asarray(t1w.dataobj, dtype=np.float32), 0.0), t1w.affine)
        std_t1w = apply_transform(brain, anat2std, template.t1w, omp_nthreads=nthreads)
        std_mask = apply_transform(new_image(inside, mask.affine), anat2std, template.t1w, omp_nthreads=nthreads)
        std_mask = new_image(np.asarray(std_mask.dataobj) > 0.5, template.affine, np.uint8)
        similarity = registration_similarity(std_t1w, template.t1w, template.mask)
        warnings = []
        if not similarity > 0.5:
            warnings.append(f"registration similarity {similarity:.2f} is low: check the registration")
        self._results["anat2std_xfm"] = str(anat2std)
        self._results["std2anat_xfm"] = str(std2anat)
        self._results["std_t1w"] = _save(std_t1w, runtime.cwd, "std_t1w")
        self._results["std_mask"] = _save(std_mask, runtime.cwd, "std_mask")
        self._results["out_report"] = _report(
            runtime.cwd, "registration", started,
            registration={"registration_similarity": round(similarity, 4),
                          "registration_similarity_metric": SIMILARITY_METRIC, "template": TEMPLATE_SPACE,
                          "warnings": warnings})
        return runtime


# --------------------------------------------------------------------------------------------------
class _TissueSegmentationInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="N4-corrected T1w")
    in_mask = File(exists=True, mandatory=True, desc="brain mask")
    std2anat_xfm = File(exists=True, mandatory=True, desc="template-to-T1w transform (warps the priors)")
    random_seed = traits.Int(0, usedefault=True, desc="ANTS_RANDOM_SEED during Atropos")
    omp_nthreads = traits.Int(1, usedefault=True, desc="ITK threads")


class _TissueSegmentationOutputSpec(TraitedSpec):
    out_tpms = OutputMultiObject(File(exists=True), desc="native GM, WM, CSF probability maps")
    out_dseg = File(exists=True, desc="native labels: 0 background, 1 GM, 2 WM, 3 CSF (uint8)")
    out_report = File(exists=True, desc="JSON: tissue volumes (mL)")


class TissueSegmentation(SimpleInterface):
    """Atropos GM/WM/CSF segmentation with warped template priors."""

    input_spec = _TissueSegmentationInputSpec
    output_spec = _TissueSegmentationOutputSpec

    def _run_interface(self, runtime):
        from ..anat.qc import map_volume_ml
        from ..anat.segment import TISSUES, segment_tissues

        started = _clock()
        tpms, dseg, info = segment_tissues(nib.load(self.inputs.in_file), nib.load(self.inputs.in_mask),
                                     self.inputs.std2anat_xfm, random_seed=self.inputs.random_seed,
                                     omp_nthreads=self.inputs.omp_nthreads)
        self._results["out_tpms"] = [_save(img, runtime.cwd, f"label-{t}_probseg") for img, t in zip(tpms, TISSUES)]
        self._results["out_dseg"] = _save(dseg, runtime.cwd, "dseg")
        volumes = {f"{t.lower()}_volume_ml": round(map_volume_ml(img), 2) for img, t in zip(tpms, TISSUES)}
        self._results["out_report"] = _report(runtime.cwd, "segmentation", started,
                                              segmentation={**volumes, **info})
        return runtime


# --------------------------------------------------------------------------------------------------
class _TemplateTissueMapsInputSpec(BaseInterfaceInputSpec):
    in_tpms = InputMultiObject(File(exists=True), mandatory=True, desc="native GM, WM, CSF probability maps")
    anat2std_xfm = File(exists=True, mandatory=True, desc="T1w-to-template transform")
    fwhm = traits.Either(None, traits.Float, usedefault=True,
                         desc="FWHM (mm) of extra smoothed modulated maps; None for none")
    omp_nthreads = traits.Int(1, usedefault=True, desc="ITK threads")


class _TemplateTissueMapsOutputSpec(TraitedSpec):
    std_tpms = OutputMultiObject(File(exists=True), desc="GM, WM, CSF on the 2 mm template grid")
    std_mod_tpms_res2 = OutputMultiObject(File(exists=True), desc="modulated GM, WM at 2 mm")
    std_mod_tpms_res1p5 = OutputMultiObject(File(exists=True), desc="modulated GM, WM at 1.5 mm")
    std_mod_tpms_res2_smooth = OutputMultiObject(File(exists=True), desc="smoothed modulated GM, WM at 2 mm")
    std_mod_tpms_res1p5_smooth = OutputMultiObject(File(exists=True), desc="smoothed modulated GM, WM at 1.5 mm")
    out_report = File(exists=True, desc="JSON: totals of the modulated maps (mL)")


class TemplateTissueMaps(SimpleInterface):
    """Tissue maps in template space: plain (2 mm) and Jacobian-modulated (2 and 1.5 mm)."""

    input_spec = _TemplateTissueMapsInputSpec
    output_spec = _TemplateTissueMapsOutputSpec

    def _run_interface(self, runtime):
        from ..anat.modulate import composed_displacement, jacobian_from_displacement, smooth_fwhm, warp_and_modulate
        from ..anat.qc import map_volume_ml
        from ..anat.segment import TISSUES
        from ..templates import get_template

        started = _clock()
        if len(self.inputs.in_tpms) != 3:
            raise ValueError(f"in_tpms must list 3 maps (GM, WM, CSF), got {len(self.inputs.in_tpms)}")
        tpms = [nib.load(p) for p in self.inputs.in_tpms]
        xfm, nthreads = self.inputs.anat2std_xfm, self.inputs.omp_nthreads
        fwhm = self.inputs.fwhm if isdefined(self.inputs.fwhm) else None
        if fwhm is not None and not fwhm > 0:
            raise ValueError(f"fwhm must be positive, got {fwhm}")
        ref2 = get_template(2.0).t1w
        totals: dict[str, float] = {f"native_{t.lower()}": round(map_volume_ml(img), 2)
                                    for img, t in zip(tpms[:2], TISSUES)}
        # composing the transform is the slow part (~5 s): once, on the 2 mm grid
        field = composed_displacement(xfm, ref2, omp_nthreads=nthreads)
        std_tpms = []
        for res, key in ((2.0, "res2"), (1.5, "res1p5")):
            ref = get_template(res).t1w
            jac = jacobian_from_displacement(field, None if res == 2.0 else ref)
            plain, smooth = [], []
            for img, tissue in zip(tpms if res == 2.0 else tpms[:2], TISSUES):
                warped, mod = warp_and_modulate(img, xfm, ref, jac, omp_nthreads=nthreads)
                if res == 2.0:
                    std_tpms.append(_save(warped, runtime.cwd, f"std_label-{tissue}_probseg"))
                if tissue == "CSF":
                    continue  # no modulated CSF map (the VBM inputs are GM and WM)
                totals[f"{key}_{tissue.lower()}"] = round(map_volume_ml(mod), 2)
                plain.append(_save(mod, runtime.cwd, f"std_{key}_label-{tissue}_mod"))
                if fwhm is not None:
                    smooth.append(_save(smooth_fwhm(mod, fwhm), runtime.cwd, f"std_{key}_label-{tissue}_modsmooth"))
            self._results[f"std_mod_tpms_{key}"] = plain
            if fwhm is not None:
                self._results[f"std_mod_tpms_{key}_smooth"] = smooth
        self._results["std_tpms"] = std_tpms
        warnings = []
        for tissue in ("gm", "wm"):
            native = totals[f"native_{tissue}"]
            for key in ("res2", "res1p5"):
                if native > 0 and abs(totals[f"{key}_{tissue}"] / native - 1) > 0.05:
                    warnings.append(f"modulated {tissue.upper()} total ({key}) differs from the native volume "
                                    f"by more than 5 %: part of the brain lies outside the template grid?")
        self._results["out_report"] = _report(runtime.cwd, "template_maps", started,
                                              modulation={"modulated_volume_ml": totals, "warnings": warnings})
        return runtime


# --------------------------------------------------------------------------------------------------
class _AnatQCInputSpec(BaseInterfaceInputSpec):
    in_reports = InputMultiObject(File(exists=True), mandatory=True, desc="JSON reports of the stages")


class _AnatQCOutputSpec(TraitedSpec):
    out_qc = File(exists=True, desc="QC record JSON (see bidsapp.anat.qc.build_qc)")


class AnatQC(SimpleInterface):
    """Merge the stages' reports into the QC record."""

    input_spec = _AnatQCInputSpec
    output_spec = _AnatQCOutputSpec

    def _run_interface(self, runtime):
        from ..anat.qc import build_qc, write_json

        parts: dict[str, dict] = {}
        seconds: dict[str, float] = {}
        cpu_seconds: dict[str, float] = {}
        for path in self.inputs.in_reports:
            report = json.loads(Path(path).read_text(encoding="utf-8"))
            seconds[report["stage"]] = float(report["seconds"])
            cpu_seconds[report["stage"]] = float(report.get("cpu_seconds", float("nan")))
            for key in ("inspection", "brainmask", "registration", "segmentation", "modulation"):
                if key in report:
                    parts[key] = report[key]
        modulation = parts.get("modulation", {})
        record = build_qc(inspection=parts.get("inspection", {}), brainmask=parts.get("brainmask", {}),
                          registration=parts.get("registration", {}),
                          segmentation=parts.get("segmentation", {}), modulation=modulation,
                          seconds=seconds, cpu_seconds=cpu_seconds, warnings=modulation.get("warnings", []))
        self._results["out_qc"] = str(write_json(Path(runtime.cwd) / "qc.json", record))
        return runtime
