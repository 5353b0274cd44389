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

from _timing import add_mni_scan_arguments, best_of, mni_scan  # noqa: E402

#: Targets of the mlens issue (LRP for one participant on CPU) and of the app (a model per scan).
TARGETS_S = {"load": None, "prepare": None, "predict (ensemble)": 20.0, "LRP map": 30.0}



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mni_scan_arguments(parser, REPO)
    args = parser.parse_args(argv)

    import torch

    from bidsapp.inference.mlens import MLensPredictor

    scan = mni_scan(args)
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
