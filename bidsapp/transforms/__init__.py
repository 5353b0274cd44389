"""Input preparation and augmentation (TorchIO-style transforms on :class:`Volume` objects)."""

from .augmentation import RandomFlip, RandomGamma, RandomIntensityScale, RandomShift
from .base import Compose, RandomTransform, Transform, Volume, parse_range
from .blocks import crop_padded, sample_block, tile_coverage, tile_origins, tile_predict
from .clinical import (ClinicalInputSpec, background_fraction, clinical_augmentation,
                       load_skull_stripped, prepare_view, prepare_views, slicing_offsets)
from .intensity import Gamma, IntensityScale, PercentileZNormalise
from .modulated import (ModulatedInput, ModulatedInputSpec, brain_box, brain_mask,
                        modulated_paths, prepare_modulated_input, smooth_fwhm, to_template_grid)
from .mni_pruned import (MLENS_REGIONS, MNIPrunedSpec, mni_region_masks, prepare_mni_input,
                         prune, pruning_box, relevance_to_template, scale_to_uint8,
                         to_network_input, unprune)
from .mni_slice import (MNISliceSpec, normalise_unit, prepare_slice_views, slice_planes,
                        slice_z_mm, view_affine)
from .spatial import (CropOrPad, Flip, ResampleToSpacing, Shift, SimulateThickSlices,
                      ThickSliceSimulation, axial_axis, foreground_centre, slicing_step)

__all__ = [
    "Volume", "Transform", "RandomTransform", "Compose", "parse_range",
    "ThickSliceSimulation", "SimulateThickSlices", "ResampleToSpacing", "CropOrPad", "Shift",
    "Flip", "axial_axis", "slicing_step", "foreground_centre",
    "PercentileZNormalise", "Gamma", "IntensityScale",
    "RandomShift", "RandomFlip", "RandomGamma", "RandomIntensityScale",
    "ClinicalInputSpec", "load_skull_stripped", "slicing_offsets", "prepare_view",
    "prepare_views", "background_fraction", "clinical_augmentation",
    "MLENS_REGIONS", "MNIPrunedSpec", "mni_region_masks", "pruning_box", "prune", "unprune",
    "scale_to_uint8", "prepare_mni_input", "to_network_input", "relevance_to_template",
    "ModulatedInputSpec", "ModulatedInput", "modulated_paths", "smooth_fwhm", "brain_box",
    "brain_mask", "prepare_modulated_input", "to_template_grid",
    "MNISliceSpec", "slice_planes", "slice_z_mm", "view_affine", "normalise_unit",
    "prepare_slice_views",
    "crop_padded", "sample_block", "tile_origins", "tile_coverage", "tile_predict",
]
