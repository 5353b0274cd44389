"""Nipype interfaces running a shipped brain-age model on one T1w's derivatives.

They write nothing into the output dataset: predictions come back as numbers and maps as files
in the node's working directory; the derivatives sink names and writes them.
"""

from __future__ import annotations

import json
import os

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, Str,
                                    TraitedSpec, isdefined, traits)

__all__ = ["DenseNetClinicalPredict", "MLensPredict"]


class _DenseNetClinicalPredictInputSpec(BaseInterfaceInputSpec):
    t1w_preproc = File(exists=True, mandatory=True, desc="native N4-corrected T1w (desc-preproc_T1w)")
    t1w_mask = File(exists=True, mandatory=True, desc="native brain mask (desc-brain_mask)")
    models_dir = Str(desc="folder with densenet-clinical.json (default: the installed models)")
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
        import torch

        from ..explain import warp_to_template
        from ..inference.densenet_clinical import MODEL_ID, DenseNetClinicalPredictor
        from ..templates import TEMPLATE_SPACE

        inputs = self.inputs
        torch.set_num_threads(max(1, inputs.num_threads))
        predictor = DenseNetClinicalPredictor.from_models_dir(
            inputs.models_dir if isdefined(inputs.models_dir) and inputs.models_dir else None,
            device=inputs.device)
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
        record = {"model": MODEL_ID, "brain_age": result.brain_age,
                  "brain_age_lower": result.lower, "brain_age_upper": result.upper,
                  "details": {"fold_predictions": list(result.fold_predictions),
                              "n_views": result.n_views, "thick_slice": result.thick_slice,
                              "variant": predictor.card.get("variant")},
                  "maps": maps}
        path = os.path.join(runtime.cwd, "prediction.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
        self._results["prediction"] = path
        return runtime


class _MLensPredictInputSpec(BaseInterfaceInputSpec):
    std_t1w = File(exists=True, mandatory=True,
                   desc="brain-masked T1w on the 2 mm template grid "
                        "(space-MNI152NLin2009aSym_res-2_desc-preproc_T1w)")
    models_dir = Str(desc="folder with mlens.json (default: the installed models)")
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
        import torch

        from ..explain.lrp import LRP_RULES
        from ..inference.mlens import MODEL_ID, MLensPredictor
        from ..templates import TEMPLATE_SPACE

        inputs = self.inputs
        torch.set_num_threads(max(1, inputs.num_threads))
        predictor = MLensPredictor.from_models_dir(
            inputs.models_dir if isdefined(inputs.models_dir) and inputs.models_dir else None,
            device=inputs.device)
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
        record = {"model": MODEL_ID, "brain_age": result.brain_age,
                  "brain_age_lower": result.lower, "brain_age_upper": result.upper,
                  "details": details, "maps": maps}
        path = os.path.join(runtime.cwd, "prediction.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
        self._results["prediction"] = path
        return runtime
