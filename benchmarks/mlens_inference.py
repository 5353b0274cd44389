"""Load, prediction and LRP time of the shipped mlens ensemble per scan, against the targets.

Usage (from the checkout root)::

    python benchmarks/mlens_inference.py [--models-dir models] [--std-t1w PATH] [--device cpu]

Without ``--std-t1w`` the first participant-level
``space-MNI152NLin2009aSym_res-2_desc-preproc_T1w`` under ``--derivatives`` is used.  Printed
(best of ``--repeats``): seconds to load every base model (sha256 + ``torch.load``), to prepare
the pruned uint8 input, to predict with the whole ensemble (with its interval), and for the LRP
map (every base model, zennit) on the 2 mm template grid; beside each, its target and the ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _timing import best_of  # noqa: E402

#: Targets of the mlens issue (LRP for one participant on CPU) and of the app (a model per scan).
TARGETS_S = {"load": None, "prepare": None, "predict (ensemble)": 20.0, "LRP map": 30.0}



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--derivatives", type=Path, default=REPO.parent / "derivs" / "ixi")
    parser.add_argument("--std-t1w", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args(argv)

    import torch

    from bidsapp.inference.mlens import MLensPredictor

    if args.threads:
        torch.set_num_threads(args.threads)
    scan = args.std_t1w or next(iter(sorted(args.derivatives.glob(
        "sub-*/anat/sub-*_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz"))), None)
    if scan is None:
        raise SystemExit(f"no MNI-space T1w under {args.derivatives}: pass --std-t1w")
    t_load, predictor = best_of(lambda: MLensPredictor.from_models_dir(args.models_dir, args.device),
                               args.repeats)
    n_models = sum(len(nets) for nets in predictor.networks.values())
    t_prep, inputs = best_of(lambda: predictor.prepare(scan), args.repeats)
    t_pred, pred = best_of(lambda: predictor.predict_prepared(inputs), args.repeats)
    t_lrp, _ = best_of(lambda: predictor.relevance_image(inputs), args.repeats)
    print(f"scan {scan.name}: brain age {pred.brain_age:.1f} y "
          f"[{pred.lower:.1f}, {pred.upper:.1f}]; {n_models} base models; device {args.device}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'step':<22}{'seconds':>9}{'target s':>10}{'ratio':>8}")
    for name, seconds in (("load", t_load), ("prepare", t_prep), ("predict (ensemble)", t_pred),
                          ("LRP map", t_lrp)):
        target = TARGETS_S[name]
        print(f"{name:<22}{seconds:>9.2f}{target if target else '-':>10}"
              f"{(seconds / target if target else float('nan')):>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
