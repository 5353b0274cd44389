"""Model-load and inference time of densenet-clinical per scan (CPU, and GPU when present).

Usage (from the checkout root)::

    python benchmarks/inference.py [--models-dir models] [--t1w T1W --mask MASK] [--device cpu]

Without ``--t1w`` the first participant-level output under ``--derivatives`` is used, or a
synthetic brain when there is none.  Printed (best of ``--repeats``): seconds to import the
packages (once per process), to load the ensemble (sha256 + ``torch.load``), to prepare the
input, to predict with one network and with the whole ensemble, and for the relevance map;
``per_network_total_s`` = load/K + prepare + one network, ``ensemble_total_s`` = load +
prepare + ensemble (imports excluded).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _timing import best_of  # noqa: E402


def _find_scan(derivatives: Path) -> tuple[Path, Path] | None:
    for t1w in sorted(derivatives.glob("sub-*/anat/sub-*_desc-preproc_T1w.nii.gz")):
        mask = t1w.with_name(t1w.name.replace("desc-preproc_T1w", "desc-brain_mask"))
        if mask.is_file():
            return t1w, mask
    return None



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--derivatives", type=Path, default=REPO.parent / "derivs" / "ixi")
    parser.add_argument("--t1w", type=Path)
    parser.add_argument("--mask", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--json", type=Path, help="also write the timings here")
    args = parser.parse_args(argv)

    t_import = time.perf_counter()
    import torch

    from bidsapp.inference.densenet_clinical import DenseNetClinicalPredictor

    t_import = time.perf_counter() - t_import  # a cold process pays this once

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.t1w and args.mask:
        scan = (args.t1w, args.mask)
    else:
        scan = _find_scan(args.derivatives)
    if scan is None:
        from training.synthetic import make_synthetic_dataset

        _, derivs = make_synthetic_dataset(tempfile.mkdtemp(), [50.0], shape=(90, 120, 120))
        scan = _find_scan(derivs)
        print("no participant-level output found: timing a synthetic 90x120x120 2 mm brain")
    t_load, predictor = best_of(lambda: DenseNetClinicalPredictor.from_models_dir(
        args.models_dir, device=args.device), args.repeats)
    t_prep, (volume, views) = best_of(lambda: predictor.prepare(*scan), args.repeats)
    one = predictor.networks[0]

    def single():
        with torch.no_grad():
            x = torch.from_numpy(__import__("numpy").stack([v.data for v in views]))[:, None]
            return float(one(x.to(predictor.device)).mean())

    t_one, _ = best_of(single, args.repeats)
    t_ens, result = best_of(lambda: predictor.predict_prepared(views), args.repeats)
    t_rel, _ = best_of(lambda: predictor.relevance_map(volume, views), 1)
    k = len(predictor.networks)
    card = predictor.card
    timings = {
        "device": str(predictor.device), "torch_threads": torch.get_num_threads(),
        "variant": card.get("variant"), "scan": str(scan[0].name), "views": len(views),
        "networks": k, "import_s": t_import, "load_ensemble_s": t_load, "load_per_network_s": t_load / k,
        "prepare_input_s": t_prep, "predict_one_network_s": t_one,
        "predict_ensemble_s": t_ens, "per_network_total_s": t_load / k + t_prep + t_one,
        "ensemble_total_s": t_load + t_prep + t_ens, "relevance_map_s": t_rel,
        "brain_age": result.brain_age}
    width = max(map(len, timings))
    for key, value in timings.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(timings, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
