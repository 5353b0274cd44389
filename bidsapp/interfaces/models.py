"""Nipype interfaces running a shipped brain-age model on one T1w's derivatives.

They write nothing into the output dataset: predictions come back as numbers and maps as files
in the node's working directory; the derivatives sink names and writes them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject,
                                    SimpleInterface, Str, TraitedSpec, isdefined, traits)

__all__ = ["DenseNetClinicalPredict", "MLensPredict", "VGGCBVPredict", "DiffusionAEPredict",
           "LocalUNetPredict"]


class _DenseNetClinicalPredictInputSpec(BaseInterfaceInputSpec):
    t1w_preproc = File(exists=True, mandatory=True, desc="native N4-corrected T1w (desc-preproc_T1w)")
    t1w_mask = File(exists=True, mandatory=True, desc="native brain mask (desc-brain_mask)")
    models_dir = Str(desc="folder with densenet-clinical/model_card.json "
                          "(default: the installed models)")
    device = Str("cpu", usedefault=True, desc="torch device")
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")
    relevance = traits.Bool(True, usedefault=True, desc="compute the guided-backpropagation map")
    anat2std_xfm = File(exists=True, desc="T1w-to-MNI152NLin2009aSym transform (.h5) to warp the map")
    std_reference = File(exists=True, desc="image on the template grid the warped map is written on")


class _DenseNetClinicalPredictOutputSpec(TraitedSpec):
    brain_age = traits.Float(desc="ensemble mean brain age (years)")
    brain_age_lower = traits.Float(desc="lower end of the 95% fold-spread interval")
    brain_age_upper = traits.Float(desc="upper end of the 95% fold-spread interval")
    fold_predictions = traits.List(traits.Float, desc="prediction of each fold model")
    n_views = traits.Int(desc="input views averaged (synthetic slicing offsets)")
    thick_slice = traits.Bool(desc="input treated as a real thick-slice scan")
    relevance_map = File(desc="guided-backpropagation magnitude in the T1w grid")
    relevance_map_std = File(desc="the same map warped to MNI152NLin2009aSym")
    prediction = File(exists=True, desc="JSON for the derivatives sink: row, details and maps")


def _models_dir(inputs):
    """The node's ``models_dir`` input, or ``None`` for the registry's folder."""
    return inputs.models_dir if isdefined(inputs.models_dir) and inputs.models_dir else None


def _load_predictor(predictor_cls: type, inputs: Any, **kwargs: Any) -> Any:
    """The node's predictor, with torch limited to the node's CPU threads.

    Parameters
    ----------
    predictor_cls : type
        A predictor class of :mod:`bidsapp.inference` (it has ``from_models_dir``).
    inputs : nipype input spec
        The node's inputs: ``num_threads``, ``models_dir`` and ``device``.
    **kwargs
        Further arguments of ``predictor_cls.from_models_dir``.

    Returns
    -------
    object
        The predictor, its card read from the node's models folder (default: the installed
        models) and its networks on the node's device.
    """
    import torch

    torch.set_num_threads(max(1, inputs.num_threads))
    return predictor_cls.from_models_dir(_models_dir(inputs), device=inputs.device, **kwargs)


def _write_prediction(cwd: str, model_id: str, result: Any, details: dict[str, Any],
                      maps: list[dict[str, Any]], provenance: dict[str, Any] | None = None) -> str:
    """Write the prediction record the derivatives sink reads; returns its path.

    Parameters
    ----------
    cwd : str
        The node's working directory.
    model_id : str
        The model's id.
    result : prediction
        The predictor's result (``brain_age``, ``lower`` and ``upper``).
    details : dict
        Model-specific details of the prediction (JSON-serialisable).
    maps : list of dict
        The maps and tables the sink writes (``file``, ``suffix``, ``meta``, ...).
    provenance : dict, optional
        What produced the row, for the ``_brainage.json`` sidecar (``ModelProvenance``).

    Returns
    -------
    str
        Path of ``prediction.json`` in ``cwd``.
    """
    record = {"model": model_id, "brain_age": result.brain_age,
              "brain_age_lower": result.lower, "brain_age_upper": result.upper,
              "details": details, "maps": maps}
    if provenance:
        record["provenance"] = provenance
    path = os.path.join(cwd, "prediction.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    return path


class DenseNetClinicalPredict(SimpleInterface):
    """Brain age with the densenet-clinical ensemble (seed 004) and its relevance map.

    Examples
    --------
    >>> node = DenseNetClinicalPredict(relevance=False)
    >>> node.inputs.device
    'cpu'
    """

    input_spec = _DenseNetClinicalPredictInputSpec
    output_spec = _DenseNetClinicalPredictOutputSpec

    def _run_interface(self, runtime):
        from ..explain import warp_to_template
        from ..inference.densenet_clinical import MODEL_ID, DenseNetClinicalPredictor
        from ..templates import TEMPLATE_SPACE

        inputs = self.inputs
        predictor = _load_predictor(DenseNetClinicalPredictor, inputs)
        volume, views = predictor.prepare(inputs.t1w_preproc, inputs.t1w_mask)
        result = predictor.predict_prepared(views)
        self._results.update(brain_age=result.brain_age, brain_age_lower=result.lower,
                             brain_age_upper=result.upper,
                             fold_predictions=list(result.fold_predictions),
                             n_views=result.n_views, thick_slice=result.thick_slice)
        maps = []
        if inputs.relevance:
            relevance = predictor.relevance_image(volume, views, like=inputs.t1w_preproc)
            native = os.path.join(runtime.cwd, "relevance_map.nii.gz")
            relevance.to_filename(native)
            self._results["relevance_map"] = native
            meta = {"Description": "Guided-backpropagation magnitude (MONAI GuidedBackpropGrad), "
                                   "mean over fold models and input views",
                    "Units": "year per unit of normalised intensity"}
            maps.append({"file": native, "suffix": "relevancemap", "meta": meta})
            if isdefined(inputs.anat2std_xfm) and isdefined(inputs.std_reference):
                std = str(warp_to_template(native, inputs.anat2std_xfm, inputs.std_reference,
                                           os.path.join(runtime.cwd, "relevance_map_std.nii.gz")))
                self._results["relevance_map_std"] = std
                maps.append({"file": std, "suffix": "relevancemap", "space": TEMPLATE_SPACE,
                             "res": "2", "meta": meta})
        details = {"fold_predictions": list(result.fold_predictions), "n_views": result.n_views,
                   "thick_slice": result.thick_slice, "variant": predictor.card.get("variant")}
        self._results["prediction"] = _write_prediction(runtime.cwd, MODEL_ID, result, details, maps)
        return runtime


class _MLensPredictInputSpec(BaseInterfaceInputSpec):
    std_t1w = File(exists=True, mandatory=True,
                   desc="brain-masked T1w on the 2 mm template grid "
                        "(space-MNI152NLin2009aSym_res-2_desc-preproc_T1w)")
    models_dir = Str(desc="folder with mlens/model_card.json (default: the installed models)")
    device = Str("cpu", usedefault=True, desc="torch device")
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")
    relevance = traits.Bool(True, usedefault=True, desc="compute the LRP relevance map")
    lrp_folds = traits.List(traits.Int, [0], usedefault=True,
                            desc="fold ensembles whose base models are explained (the paper "
                                 "explained one ensemble; empty list = all folds)")


class _MLensPredictOutputSpec(TraitedSpec):
    brain_age = traits.Float(desc="MLens brain age (years)")
    brain_age_lower = traits.Float(desc="lower end of the model card's 95% interval")
    brain_age_upper = traits.Float(desc="upper end of the model card's 95% interval")
    subensemble_predictions = traits.Dict(desc="sub-ensemble name -> prediction")
    relevance_map_std = File(desc="LRP relevance on the 2 mm MNI152NLin2009aSym grid")
    relevance_maps_input = traits.List(File(), desc="LRP relevance of each sub-ensemble on its "
                                                    "pruned input grid")
    prediction = File(exists=True, desc="JSON for the derivatives sink: row, details and maps")


class MLensPredict(SimpleInterface):
    """Brain age with the MLens multi-level ensemble (seed 002) and its LRP relevance map.

    Examples
    --------
    >>> node = MLensPredict(relevance=False)
    >>> node.inputs.lrp_folds
    [0]
    """

    input_spec = _MLensPredictInputSpec
    output_spec = _MLensPredictOutputSpec

    def _run_interface(self, runtime):
        import time

        import numpy as np

        from ..explain.lrp import LRP_RULES
        from ..inference.mlens import MODEL_ID, MLensPredictor
        from ..templates import TEMPLATE_SPACE

        inputs = self.inputs
        predictor = _load_predictor(MLensPredictor, inputs)
        prepared = predictor.prepare(inputs.std_t1w)
        result = predictor.predict_prepared(prepared)
        self._results.update(brain_age=result.brain_age, brain_age_lower=result.lower,
                             brain_age_upper=result.upper,
                             subensemble_predictions=dict(result.subensembles))
        details = {**result.details(), "variant": predictor.card.get("variant"),
                   "ensemble_type": predictor.card["ensemble"].get("type")}
        maps = []
        if inputs.relevance:
            folds = list(inputs.lrp_folds) or None
            t0 = time.perf_counter()
            per_sub = predictor.relevance_maps(prepared, folds)
            img = predictor.relevance_image(prepared, folds)
            std = os.path.join(runtime.cwd, "relevance_map_std.nii.gz")
            img.to_filename(std)
            files = []
            for sub, (volume, _) in per_sub.items():
                path = os.path.join(runtime.cwd, f"relevance_{sub}_input.nii.gz")
                volume.to_nifti().to_filename(path)
                files.append(path)
            self._results.update(relevance_map_std=std, relevance_maps_input=files)
            evidence = {sub: float(np.mean(e)) for sub, (_, e) in per_sub.items()}
            details["lrp"] = {"folds": folds or predictor.folds, "seconds": time.perf_counter() - t0,
                              "map_sum": float(np.asarray(img.dataobj).sum()),
                              "mean_prediction_minus_bias": evidence, "rules": LRP_RULES}
            meta = {"Description": "Layer-wise relevance propagation (zennit; epsilon on dense "
                                   "layers, alpha1-beta0 on convolutions, flat on the first "
                                   "layer), mean over the base models of each sub-ensemble, "
                                   "sub-ensemble regions added; positive = evidence for an age "
                                   "above the training mean",
                    "Units": "years"}
            maps.append({"file": std, "suffix": "relevancemap", "space": TEMPLATE_SPACE,
                         "res": "2", "meta": meta})
        self._results["prediction"] = _write_prediction(runtime.cwd, MODEL_ID, result, details, maps)
        return runtime


class _VGGCBVPredictInputSpec(BaseInterfaceInputSpec):
    std_t1w = File(exists=True, mandatory=True,
                   desc="brain-masked T1w on the 2 mm template grid "
                        "(space-MNI152NLin2009aSym_res-2_desc-preproc_T1w)")
    sex = Str(desc="sex from participants.tsv (F/M ...): selects the stack with sex (TS, TAS)")
    cbv_model = File(exists=True, desc="CBV synthesis checkpoint (cbv_synth.pt): runs the CBV "
                                       "branch on the CBV map it synthesises from std_t1w")
    models_dir = Str(desc="models folder with the vgg-cbv card (default: the installed models)")
    device = Str("cpu", usedefault=True, desc="torch device")
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")
    relevance = traits.Bool(True, usedefault=True, desc="compute the Grad-CAM map")


class _VGGCBVPredictOutputSpec(TraitedSpec):
    brain_age = traits.Float(desc="stacked fold-ensemble brain age (years)")
    brain_age_lower = traits.Float(desc="lower end of the 95% fold interval")
    brain_age_upper = traits.Float(desc="upper end of the 95% fold interval")
    stack = Str(desc="stack applied: T, TS, TA, TAS (none: a card without coefficients)")
    branches = Str(desc="branches that ran: T1w or T1w+CBV")
    relevance_map_std = File(desc="top-20% Grad-CAM map on the 2 mm MNI152NLin2009aSym grid")
    prediction = File(exists=True, desc="JSON for the derivatives sink: row, details, maps and "
                                        "provenance")


class VGGCBVPredict(SimpleInterface):
    """Brain age with the vgg-cbv VGG8 fold ensemble and stack (seed 003), and its Grad-CAM map.

    Examples
    --------
    >>> node = VGGCBVPredict(sex="F")
    >>> node.inputs.relevance
    True
    """

    input_spec = _VGGCBVPredictInputSpec
    output_spec = _VGGCBVPredictOutputSpec

    def _run_interface(self, runtime):
        from ..inference.vgg_cbv import (GRADCAM_TOP_FRACTION, MODEL_ID, VGGCBVPredictor,
                                         cbv_source_label, synthesise_cbv_image)
        from ..templates import TEMPLATE_SPACE

        inputs = self.inputs
        predictor = _load_predictor(VGGCBVPredictor, inputs)
        cbv_model = inputs.cbv_model if isdefined(inputs.cbv_model) else None
        cbv = (synthesise_cbv_image(inputs.std_t1w, cbv_model, device=inputs.device)
               if cbv_model else None)
        prepared = predictor.prepare(inputs.std_t1w, cbv)
        result = predictor.predict_prepared(
            prepared, sex=inputs.sex if isdefined(inputs.sex) else None,
            cbv_source=cbv_source_label(cbv_model) if cbv_model else None)
        provenance = result.provenance()
        self._results.update(brain_age=result.brain_age, brain_age_lower=result.lower,
                             brain_age_upper=result.upper, stack=result.stack,
                             branches=provenance["Branches"])
        maps = []
        if inputs.relevance:
            std = os.path.join(runtime.cwd, "gradcam_std.nii.gz")
            predictor.gradcam_image(prepared["t1w"], inputs.std_t1w).to_filename(std)
            self._results["relevance_map_std"] = std
            meta = {"Description": "Grad-CAM (MONAI) of the last convolution block of the T1w "
                                   "encoder, mean over the fold networks, resampled from the "
                                   "network input grid to the template grid; only the top "
                                   f"{GRADCAM_TOP_FRACTION:.0%} of its values inside the brain "
                                   "are kept, the rest set to 0 (Jomsky et al., Fig. 4)",
                    "Method": "Grad-CAM", "Layer": predictor.networks["t1w"][0].gradcam_layer,
                    "Branch": "T1w", "TopFraction": GRADCAM_TOP_FRACTION,
                    "Units": "arbitrary (ReLU of gradient-weighted activations)"}
            maps.append({"file": std, "suffix": "relevancemap", "space": TEMPLATE_SPACE,
                         "res": "2", "meta": meta})
        details = {**result.details(), "variant": predictor.card.get("variant")}
        self._results["prediction"] = _write_prediction(runtime.cwd, MODEL_ID, result, details,
                                                        maps, provenance)
        return runtime


class _DiffusionAEPredictInputSpec(BaseInterfaceInputSpec):
    std_t1w = File(exists=True, mandatory=True,
                   desc="brain-masked T1w on the 2 mm template grid "
                        "(space-MNI152NLin2009aSym_res-2_desc-preproc_T1w)")
    models_dir = Str(desc="models folder with the diffusion-ae card (default: the installed models)")
    device = Str("cpu", usedefault=True, desc="torch device")
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")
    random_seed = traits.Int(0, usedefault=True, desc="seed of the Monte-Carlo dropout masks")
    mc_samples = traits.Int(desc="Monte-Carlo dropout passes per fold (default: the card's)")
    ddim_steps = traits.Int(desc="DDIM steps of the reconstruction (default: the card's; "
                                 "--ddim-steps)")
    reconstruction = traits.Bool(True, usedefault=True,
                                 desc="DDIM-reconstruct the medial slice and write the slices")


class _DiffusionAEPredictOutputSpec(TraitedSpec):
    brain_age = traits.Float(desc="mean of the fold networks' predictions (years)")
    brain_age_lower = traits.Float(desc="2.5th percentile of the pooled MC-dropout passes")
    brain_age_upper = traits.Float(desc="97.5th percentile of the pooled MC-dropout passes")
    mc_sd = traits.Float(desc="SD of the pooled MC-dropout passes (years)")
    ssim = traits.Float(desc="SSIM of the reconstruction against the input slice")
    psnr = traits.Float(desc="PSNR (dB) of the reconstruction against the input slice")
    input_slice = File(desc="the prepared medial axial slice (network input)")
    recon_slice = File(desc="its DDIM reconstruction, clipped to [0, 1]")
    recon_error_slice = File(desc="absolute difference of the two")
    prediction = File(exists=True, desc="JSON for the derivatives sink: row, details, slices and "
                                        "provenance")


class DiffusionAEPredict(SimpleInterface):
    """Brain age with the diffusion-ae fold ensemble (seed 001), its MC-dropout interval and the
    DDIM reconstruction of the medial slice.

    Examples
    --------
    >>> node = DiffusionAEPredict(ddim_steps=20)
    >>> node.inputs.reconstruction, node.inputs.random_seed
    (True, 0)
    """

    input_spec = _DiffusionAEPredictInputSpec
    output_spec = _DiffusionAEPredictOutputSpec

    def _run_interface(self, runtime):
        import math

        from ..inference.diffusion_ae import MODEL_ID, SLICE_SUFFIXES, DiffusionAEPredictor
        from ..templates import TEMPLATE_SPACE

        inputs = self.inputs
        predictor = _load_predictor(
            DiffusionAEPredictor, inputs,
            mc_samples=inputs.mc_samples if isdefined(inputs.mc_samples) else None,
            ddim_steps=inputs.ddim_steps if isdefined(inputs.ddim_steps) else None)
        result = predictor.predict(inputs.std_t1w, seed=inputs.random_seed,
                                   reconstruct=inputs.reconstruction)
        self._results.update(brain_age=result.brain_age, brain_age_lower=result.lower,
                             brain_age_upper=result.upper, mc_sd=result.mc_sd)
        maps = []
        rec = result.reconstruction
        if rec is not None:
            self._results.update(ssim=rec.ssim, psnr=rec.psnr)
            slice_meta = {
                "Slice": "medial axial slice of the MNI-space T1w (bidsapp.transforms.mni_slice; "
                         f"MNI z = {result.slice_z_mm:.2f} mm), {predictor.spec.size} x "
                         f"{predictor.spec.size} pixels over the template field of view",
                "Resolution": "one axial plane resampled from the 2 mm template grid: "
                              f"{predictor.spec.size}^2 pixels over its field of view, one plane "
                              f"of a {predictor.spec.grid_size}^3 cube thick",
                "Fold": rec.fold, "DDIMSteps": rec.ddim_steps}
            texts = {
                "input": ("The network input: the medial axial slice, min-max normalised to "
                          "[0, 1]", "arbitrary (normalised intensity)"),
                "reconstruction": ("DDIM reconstruction of the input slice by the diffusion "
                                   "autoencoder of the first fold: deterministic DDIM encoding to "
                                   "x_T conditioned on z_sem, then decoding; clipped to [0, 1]",
                                   "arbitrary (normalised intensity)"),
                "difference": ("Absolute difference between the reconstruction and the input "
                               "slice", "arbitrary (normalised intensity)")}
            outputs = {"input": "input_slice", "reconstruction": "recon_slice",
                       "difference": "recon_error_slice"}
            images = rec.images(predictor.spec)
            for key, suffix in SLICE_SUFFIXES.items():
                path = os.path.join(runtime.cwd, f"{suffix}.nii.gz")
                images[suffix].to_filename(path)
                self._results[outputs[key]] = path
                text, units = texts[key]
                meta = {"Description": text, "Units": units, **slice_meta}
                if key != "input":
                    meta.update(SSIM=rec.ssim, PSNR=rec.psnr if math.isfinite(rec.psnr) else None,
                                DataRange=1.0)
                maps.append({"file": path, "suffix": suffix, "space": TEMPLATE_SPACE,
                             "meta": meta})
        details = {**result.details(), "variant": predictor.card.get("variant")}
        self._results["prediction"] = _write_prediction(runtime.cwd, MODEL_ID, result, details,
                                                        maps, result.provenance())
        return runtime


class _LocalUNetPredictInputSpec(BaseInterfaceInputSpec):
    std_mod_tpms_res2 = InputMultiObject(File(exists=True), desc="modulated GM, WM on the 2 mm "
                                         "template grid (read by models working at >= 2 mm)")
    std_mod_tpms_res1p5 = InputMultiObject(File(exists=True), desc="modulated GM, WM on the "
                                           "1.5 mm template grid (read by models at 1.5 mm)")
    age = traits.Float(desc="chronological age (years) for the brain-PAD map and ROI brain-PAD")
    models_dir = Str(desc="folder with local-unet/model_card.json (default: the installed models)")
    device = Str("cpu", usedefault=True, desc="torch device")
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")
    mc_samples = traits.Int(desc="Monte-Carlo dropout samples per fold (default: the card's)")


class _LocalUNetPredictOutputSpec(TraitedSpec):
    brain_age = traits.Float(desc="mean of the brain-age map over the brain mask (years)")
    brain_age_lower = traits.Float(desc="lower end of the 95% fold/sample interval")
    brain_age_upper = traits.Float(desc="upper end of the 95% fold/sample interval")
    brainage_map = File(desc="voxelwise brain age on the 2 mm template grid")
    brainage_sd_map = File(desc="voxelwise SD over fold x dropout-sample maps")
    brainpad_map = File(desc="brain-age map minus age (when the age is known)")
    roi_table = File(desc="mean brain age (and brain-PAD) per Harvard-Oxford ROI")
    prediction = File(exists=True, desc="JSON for the derivatives sink: row, details and maps")


class LocalUNetPredict(SimpleInterface):
    """Local (voxelwise) brain age with the local-unet model (seed 000).

    Examples
    --------
    >>> node = LocalUNetPredict()
    >>> node.inputs.num_threads
    1
    """

    input_spec = _LocalUNetPredictInputSpec
    output_spec = _LocalUNetPredictOutputSpec

    def _run_interface(self, runtime):
        import math

        from ..errors import InputMissingError
        from ..inference.local_unet import MODEL_ID, LocalUNetPredictor, roi_table
        from ..templates import TEMPLATE_SPACE

        inputs = self.inputs
        predictor = _load_predictor(
            LocalUNetPredictor, inputs,
            mc_samples=inputs.mc_samples if isdefined(inputs.mc_samples) else None)
        grid = "res1p5" if predictor.spec.source_resolution_mm == 1.5 else "res2"
        paths = getattr(inputs, f"std_mod_tpms_{grid}")
        if not isdefined(paths) or len(paths) != 2:
            raise InputMissingError(f"local-unet needs the modulated GM and WM maps ({grid})")
        result = predictor.predict(paths)
        age = inputs.age if isdefined(inputs.age) and math.isfinite(inputs.age) else None
        images = result.images(age)
        self._results.update(brain_age=result.brain_age, brain_age_lower=result.lower,
                             brain_age_upper=result.upper)
        descriptions = {
            "brainagemap": ("Voxelwise brain age (local brain age, seed 000): mean over the fold "
                            "networks and dropout samples of the tiled U-Net predictions; NaN "
                            "outside the template brain mask", "year"),
            "brainagesdmap": ("Voxelwise SD of the brain age over the fold x dropout-sample maps",
                              "year"),
            "brainpadmap": ("Voxelwise brain-PAD: brain-age map minus chronological age "
                            "(uncorrected for regression to the mean)", "year")}
        outputs = {"brainagemap": "brainage_map", "brainagesdmap": "brainage_sd_map",
                   "brainpadmap": "brainpad_map"}
        maps = []
        for suffix, img in images.items():
            path = os.path.join(runtime.cwd, f"{suffix}.nii.gz")
            img.to_filename(path)
            self._results[outputs[suffix]] = path
            text, units = descriptions[suffix]
            maps.append({"file": path, "suffix": suffix, "space": TEMPLATE_SPACE, "res": "2",
                         "meta": {"Description": text, "Units": units}})
        table = os.path.join(runtime.cwd, "roi.tsv")
        roi_table(images["brainagemap"], age).to_csv(table, sep="\t", index=False, na_rep="n/a",
                                                     float_format="%.4f")
        self._results["roi_table"] = table
        maps.append({"file": table, "suffix": "brainageroi", "extension": ".tsv",
                     "space": TEMPLATE_SPACE, "res": "2", "meta": _ROI_COLUMNS})
        details = {"n_folds": result.n_folds, "mc_samples": result.mc_samples,
                   "sample_global": list(result.sample_global),
                   "input_resolution_mm": predictor.spec.resolution_mm,
                   "variant": predictor.card.get("variant")}
        self._results["prediction"] = _write_prediction(runtime.cwd, MODEL_ID, result, details, maps)
        return runtime


#: Data dictionary of the ROI table (its JSON sidecar).
_ROI_COLUMNS = {
    "index": {"Description": "label value in the Harvard-Oxford maximum-probability image "
                             "(thresholded at 25%, cortical + subcortical)"},
    "name": {"Description": "Harvard-Oxford structure"},
    "hemisphere": {"Description": "left, right or bilateral"},
    "atlas": {"Description": "cortical or subcortical"},
    "n_voxels": {"Description": "voxels of the ROI with a brain age (2 mm grid)"},
    "brain_age": {"Description": "mean voxelwise brain age in the ROI", "Units": "year"},
    "brain_pad": {"Description": "ROI brain age minus chronological age (ROI-level brain-PAD, "
                                 "seed 000); n/a when the age is unknown", "Units": "year"},
}
