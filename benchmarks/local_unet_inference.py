"""Time of local-unet (seed 000) inference + maps per scan on CPU, against the 60 s target.

Usage (from the checkout root)::

    python benchmarks/local_unet_inference.py [--models-dir models] [--threads 1]

With a shipped ``<models-dir>/local-unet/model_card.json`` its fold networks are timed.  Without
one (another models folder, or an architecture to try) the networks of ``--config`` (default
the reduced CPU configuration) are built with random weights and written with a minimal card
to a temporary folder: the time of a forward pass does not depend on the weight values, so the
numbers hold for trained weights of that architecture.  The input is the participant-level
modulated GM/WM maps of the first participant under ``--derivatives``.

Printed (each stage once, in this fresh process, as in a participant's model node; best of
``--repeats`` otherwise): load (sha256 + ``torch.load`` of every fold), prepare (read,
smooth, resample, crop), predict (tiling every fold network over the brain mask: brain-age and
SD maps, global value and interval), maps (the 2 mm template-grid brain-age, SD and PAD images
written as NIfTI) and the Harvard-Oxford ROI table (atlas resampling included, as in a fresh
participant process); ``total_s`` = their sum and its ratio to the
60 s target of issue #8.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _timing import best_of  # noqa: E402

TARGET_S = 60.0


def _untrained_card(config_path: Path, folder: Path, folds: int) -> Path:
    """A minimal local-unet card with ``folds`` randomly initialised networks of the config."""
    import torch

    from training.config import load_config
    from training.families import get_family

    config = load_config(config_path)
    family = get_family(config.family, config.model, config.input)
    weights = []
    for k in range(folds):
        torch.manual_seed(k)
        net = family.build_network()
        net.set_target_scaling(50.0, 15.0)
        path = folder / f"fold{k}.pt"
        torch.save(net.state_dict(), path)
        weights.append({"fold": k, "file": path.name,
                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    card = {"id": "local-unet", "family": "local-unet",
            "note": f"UNTRAINED networks of {config_path.name}, for timing only",
            "input": {"params": family.input_params},
            "architecture": {"net_kwargs": family.net_kwargs(), "blocks": family.block_geometry()},
            "weights": weights}
    path = folder / "model_card.json"
    path.write_text(json.dumps(card, indent=1))
    return path


def _first_participant(derivatives: Path, spec) -> tuple[Path, str]:
    from bidsapp.transforms.modulated import modulated_paths

    for anat in sorted(derivatives.glob("sub-*/anat")):
        prefix = anat.parent.name
        if all(Path(p).is_file() for p in modulated_paths(anat, prefix, spec)):
            return anat, prefix
    raise SystemExit(f"no participant with modulated GM/WM maps under {derivatives}: run "
                     "'brainage BIDS OUT participant' first or pass --derivatives")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--config", type=Path,
                        default=REPO / "training" / "configs" / "local-unet-cpu.toml")
    parser.add_argument("--folds", type=int, default=5, help="networks of the untrained card")
    parser.add_argument("--derivatives", type=Path, default=REPO.parent / "derivs" / "ixi")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1,
                        help="best of N; N > 1 times later calls with warm caches (template, "
                             "atlas), which a participant's fresh model process does not have")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args(argv)

    import torch

    from bidsapp.inference.local_unet import LocalUNetPredictor, roi_table

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        shipped = (args.models_dir / "local-unet" / "model_card.json").is_file()
        card_path = (args.models_dir / "local-unet" / "model_card.json" if shipped
                     else _untrained_card(args.config, Path(tmp), args.folds))
        card = json.loads(card_path.read_text())
        load_s, predictor = best_of(lambda: LocalUNetPredictor(card, card_path.parent,
                                                               device=args.device), args.repeats)
        anat, prefix = _first_participant(args.derivatives, predictor.spec)
        paths = predictor.input_paths(anat, prefix)
        prepare_s, prepared = best_of(lambda: predictor.prepare(paths), args.repeats)
        predict_s, result = best_of(lambda: predictor.predict_prepared(prepared), args.repeats)
        out = Path(tmp) / "maps"
        out.mkdir()

        def write_maps():
            images = result.images(50.0)
            for suffix, img in images.items():
                img.to_filename(str(out / f"{suffix}.nii.gz"))
            return images

        maps_s, images = best_of(write_maps, args.repeats)
        # a participant's model node is a fresh process: time the ROI table with the atlas
        # resampled to the map grid (cached after the first call within a process)
        from bidsapp import atlases

        def roi():
            atlases._resampled.cache_clear()
            return roi_table(images["brainagemap"], 50.0)

        roi_s, table = best_of(roi, args.repeats)
    total = load_s + prepare_s + predict_s + maps_s + roi_s
    report = {"weights": "shipped" if shipped else f"untrained networks of {args.config.name}",
              "scan": f"{anat}/{prefix}", "device": args.device,
              "threads": torch.get_num_threads(), "folds": len(predictor.networks),
              "mc_samples": predictor.mc_samples, "tile_stride": predictor.tile_stride,
              "blocks": [predictor.in_size, predictor.out_size],
              "load_s": round(load_s, 2), "prepare_s": round(prepare_s, 2),
              "predict_s": round(predict_s, 2), "maps_s": round(maps_s, 2),
              "roi_table_s": round(roi_s, 2), "roi_rows": int(len(table)),
              "total_s": round(total, 2), "target_s": TARGET_S,
              "ratio_to_target": round(total / TARGET_S, 3)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
