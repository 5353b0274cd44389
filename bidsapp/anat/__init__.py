"""Anatomical preprocessing of one T1w image: pure functions on nibabel images and paths.

Stages, in workflow order (see :func:`bidsapp.workflows.anatomical.init_anat_preproc_wf`):

* :mod:`~bidsapp.anat.checks` -- input checks (refusals with :class:`~bidsapp.errors.ImageError`),
  flags and reorientation to RAS;
* :mod:`~bidsapp.anat.brainmask` -- deepbet brain extraction, skull-stripped-input detection;
* :mod:`~bidsapp.anat.bias` -- N4 bias field estimated on a 2 mm working grid;
* :mod:`~bidsapp.anat.register` -- ANTs affine + SyN registration to the template;
* :mod:`~bidsapp.anat.segment` -- Atropos GM/WM/CSF segmentation with template priors;
* :mod:`~bidsapp.anat.modulate` -- Jacobian-modulated tissue maps on the template grids;
* :mod:`~bidsapp.anat.qc` -- volumes and the QC record.

Importing this package is cheap: ANTs and torch are imported inside the functions that use them.
"""

__all__: list[str] = []
