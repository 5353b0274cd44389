"""Time of the shipped diffusion-ae model per scan on CPU: prediction and DDIM reconstruction.

Usage (from the checkout root)::

    python benchmarks/diffusion_ae_inference.py [--models-dir models] [--std-t1w PATH]
        [--ddim-steps 100 50 20] [--device cpu] [--threads 1]

Without ``--std-t1w`` the first participant-level
``space-MNI152NLin2009aSym_res-2_desc-preproc_T1w`` under ``--derivatives`` is used.  Printed
(best of ``--repeats``): seconds to load the fold networks (sha256 + ``torch.load``), to prepare
the slices, to predict (every fold, the Monte-Carlo dropout passes) and, for each number of DDIM
steps, to reconstruct the medial slice, with the reconstruction's SSIM/PSNR; then prediction +
reconstruction against the issue's target of 20 s per scan on CPU, as a ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _timing import add_mni_scan_arguments, best_of, mni_scan  # noqa: E402

#: Target of the diffusion-ae issue: inference + reconstruction per scan on CPU.
TARGET_S = 20.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mni_scan_arguments(parser, REPO)
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[100, 50, 20])
    args = parser.parse_args(argv)

    import torch

    from bidsapp.inference.diffusion_ae import DiffusionAEPredictor

    scan = mni_scan(args)
    t_load, predictor = best_of(
        lambda: DiffusionAEPredictor.from_models_dir(args.models_dir, args.device), args.repeats)
    t_prep, views = best_of(lambda: predictor.prepare(scan), args.repeats)
    t_pred, pred = best_of(lambda: predictor.predict_prepared(views, reconstruct=False),
                           args.repeats)
    print(f"scan {scan.name}: brain age {pred.brain_age:.1f} y [{pred.lower:.1f}, "
          f"{pred.upper:.1f}] ({len(predictor.networks)} folds x {pred.mc_samples} MC passes, "
          f"{len(views)} slice(s) of {predictor.spec.size}^2); device {args.device}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'step':<34}{'seconds':>9}{'target s':>10}{'ratio':>8}")
    print(f"{'load':<34}{t_load:>9.2f}{'-':>10}{'-':>8}")
    print(f"{'prepare slices':<34}{t_prep:>9.2f}{'-':>10}{'-':>8}")
    print(f"{'predict (folds, MC dropout)':<34}{t_pred:>9.2f}{'-':>10}{'-':>8}")
    for steps in args.ddim_steps:
        t_rec, rec = best_of(lambda: predictor.reconstruct(views[0], ddim_steps=steps),
                             args.repeats)
        total = t_prep + t_pred + t_rec
        print(f"{f'reconstruct ({steps} DDIM steps)':<34}{t_rec:>9.2f}{'-':>10}{'-':>8}"
              f"   SSIM {rec.ssim:.3f}, PSNR {rec.psnr:.1f} dB")
        print(f"{f'prepare+predict+reconstruct ({steps})':<34}{total:>9.2f}{TARGET_S:>10.0f}"
              f"{total / TARGET_S:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
