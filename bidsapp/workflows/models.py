"""Brain-age models on one T1w's preprocessing results: one node per model, merged for the sink."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

__all__ = ["MODEL_INPUT_FIELDS", "init_models_wf"]

#: Preprocessing outputs the models read (a subset of the anatomical ``outputnode``).
MODEL_INPUT_FIELDS = ("t1w_preproc", "t1w_mask", "anat2std_xfm", "std_mask", "std_t1w",
                      "std_mod_tpms_res2", "std_mod_tpms_res1p5")


def _densenet_clinical_node(device: str, omp_nthreads: int) -> tuple[pe.Node, dict[str, str]]:
    from ..interfaces.models import DenseNetClinicalPredict

    node = pe.Node(DenseNetClinicalPredict(device=device, num_threads=omp_nthreads),
                   name="densenet_clinical", n_procs=omp_nthreads, mem_gb=2.0)
    return node, {"t1w_preproc": "t1w_preproc", "t1w_mask": "t1w_mask",
                  "anat2std_xfm": "anat2std_xfm", "std_mask": "std_reference"}


def _mlens_node(device: str, omp_nthreads: int) -> tuple[pe.Node, dict[str, str]]:
    from ..interfaces.models import MLensPredict

    node = pe.Node(MLensPredict(device=device, num_threads=omp_nthreads),
                   name="mlens", n_procs=omp_nthreads, mem_gb=2.0)
    return node, {"std_t1w": "std_t1w"}


def _vgg_cbv_node(device: str, omp_nthreads: int) -> tuple[pe.Node, dict[str, str]]:
    from ..interfaces.models import VGGCBVPredict

    node = pe.Node(VGGCBVPredict(device=device, num_threads=omp_nthreads),
                   name="vgg_cbv", n_procs=omp_nthreads, mem_gb=2.0)
    return node, {"std_t1w": "std_t1w"}


def _diffusion_ae_node(device: str, omp_nthreads: int) -> tuple[pe.Node, dict[str, str]]:
    from ..interfaces.models import DiffusionAEPredict

    # five fold networks of the paper size (9.6 M parameters each, 190 MB together) and one
    # 128^2 slice at a time: about 0.7 GB resident with torch; the DDIM reconstruction (200
    # U-Net passes for 100 steps) dominates the run time, not the memory
    node = pe.Node(DiffusionAEPredict(device=device, num_threads=omp_nthreads),
                   name="diffusion_ae", n_procs=omp_nthreads, mem_gb=1.5)
    return node, {"std_t1w": "std_t1w"}


def _local_unet_node(device: str, omp_nthreads: int) -> tuple[pe.Node, dict[str, str]]:
    from ..interfaces.models import LocalUNetPredict

    node = pe.Node(LocalUNetPredict(device=device, num_threads=omp_nthreads),
                   name="local_unet", n_procs=omp_nthreads, mem_gb=3.0)
    return node, {"std_mod_tpms_res2": "std_mod_tpms_res2",
                  "std_mod_tpms_res1p5": "std_mod_tpms_res1p5"}


#: Node factory of each model id: returns the node and how inputnode fields map onto it.
_FACTORIES = {"densenet-clinical": _densenet_clinical_node, "mlens": _mlens_node,
              "vgg-cbv": _vgg_cbv_node, "diffusion-ae": _diffusion_ae_node,
              "local-unet": _local_unet_node}


def init_models_wf(*, models: Sequence[str], device: str = "cpu", omp_nthreads: int = 1,
                   age: float | None = None, sex: str | None = None,
                   cbv_model: str | Path | None = None, ddim_steps: int | None = None,
                   random_seed: int = 0, name: str = "models_wf") -> pe.Workflow:
    """Run the selected brain-age models on one T1w.

    Parameters
    ----------
    models : sequence of str
        Model ids (``ensemble`` is computed by the sink, not here).
    device : str
        Torch device.
    omp_nthreads : int
        Threads per model node.
    age : float, optional
        Chronological age of the scan, for models that write brain-PAD maps (``local-unet``).
    sex : str, optional
        Sex from the phenotype tables, for models whose stack uses it (``vgg-cbv``).
    cbv_model : path, optional
        CBV synthesis checkpoint for the CBV branch of ``vgg-cbv``.
    ddim_steps : int, optional
        DDIM steps of the ``diffusion-ae`` reconstruction (default: its model card's).
    random_seed : int
        Master seed; seeds the Monte-Carlo dropout masks of ``diffusion-ae``.

    Returns
    -------
    Workflow
        ``inputnode`` takes :data:`MODEL_INPUT_FIELDS`; ``outputnode.predictions`` is the list
        of the models' prediction JSON files.
    """
    selected = [m for m in models if m != "ensemble"]
    unknown = [m for m in selected if m not in _FACTORIES]
    if unknown:
        raise ValueError(f"no workflow node for model(s) {unknown}; known: {sorted(_FACTORIES)}")
    if not selected:
        raise ValueError("init_models_wf needs at least one model")
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=list(MODEL_INPUT_FIELDS)), name="inputnode")
    merge = pe.Node(niu.Merge(len(selected)), name="merge_predictions", run_without_submitting=True)
    outputnode = pe.Node(niu.IdentityInterface(fields=["predictions"]), name="outputnode")
    for index, model in enumerate(selected, start=1):
        node, fields = _FACTORIES[model](device, omp_nthreads)
        # the prediction JSON names the node's map files: nipype must not prune them
        node.config = {"execution": {"remove_unnecessary_outputs": False}}
        traits = node.inputs.copyable_trait_names()
        if age is not None and "age" in traits:
            node.inputs.age = float(age)
        if sex is not None and "sex" in traits:
            node.inputs.sex = str(sex)
        if cbv_model is not None and "cbv_model" in traits:
            node.inputs.cbv_model = str(cbv_model)
        if ddim_steps is not None and "ddim_steps" in traits:
            node.inputs.ddim_steps = int(ddim_steps)
        if "random_seed" in traits:
            node.inputs.random_seed = int(random_seed)
        workflow.connect([(inputnode, node, list(fields.items())),
                          (node, merge, [("prediction", f"in{index}")])])
    workflow.connect(merge, "out", outputnode, "predictions")
    return workflow
