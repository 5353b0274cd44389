"""The training engine end to end on tiny synthetic data: CLI, export, resume, DDP, fine-tuning."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from bidsapp.errors import ModelError
from bidsapp.inference.weights import sha256_file
from training.__main__ import main
from training.config import load_config
from training.run import run_training
from training.trainer import Trainer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_dataset):
    """One complete 3-fold CLI run with export (shared by the tests below)."""
    from training_configs import tiny_config_text

    root = tmp_path_factory.mktemp("trained")
    cfg = root / "tiny.toml"
    cfg.write_text(tiny_config_text(*synth_dataset, root / "work", root / "models", max_epochs=3))
    assert main([str(cfg)]) == 0
    return root


def test_cli_exports_card_weights_and_predictions(trained, synth_dataset):
    folder = trained / "models" / "densenet-clinical"
    # one self-contained model folder: the card next to every weight file, nothing beside it
    assert sorted(p.name for p in (trained / "models").iterdir()) == ["densenet-clinical"]
    card = json.loads((folder / "model_card.json").read_text())
    assert card["id"] == "densenet-clinical" and card["variant"] == "tiny-test"
    assert card["training_data"]["n_scans"] == 18 and card["training_data"]["age_min"] == 20.0
    assert len(card["weights"]) == 3
    assert sorted(w["file"] for w in card["weights"]) == sorted(p.name for p in folder.glob("*.pt"))
    assert (folder / card["split"]["file"]).is_file()
    assert (folder / card["metrics"]["cross_validation"]["predictions"]).is_file()
    for entry in card["weights"]:
        path = folder / entry["file"]
        assert sha256_file(path) == entry["sha256"]
        state = torch.load(path, weights_only=True)
        dtypes = {v.dtype for k, v in state.items() if k.endswith("weight")}
        assert dtypes == {torch.float16 if entry["dtype"] == "float16" else torch.float32}
        assert state["target_offset"].dtype == torch.float32
        assert entry["fp16_max_change_years"] < 0.05 or entry["dtype"] == "float32"
    with open(trained / "models" / "densenet-clinical" / "cv_predictions.tsv") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert sorted(r["participant"] for r in rows) == sorted(f"s{i:03d}" for i in range(18))
    pooled = card["metrics"]["cross_validation"]["pooled"]
    mae = np.mean([abs(float(r["predicted"]) - float(r["age"])) for r in rows])
    assert pooled["mae"] == pytest.approx(mae, abs=2e-3) and pooled["n"] == 18
    # every participant's fold in the table is the fold whose test part holds it
    splits = json.loads((trained / "models" / "densenet-clinical" / "splits.json").read_text())
    for r in rows:
        assert r["participant"] in splits["folds"][int(r["fold"])]["test"]
    # the planted age effect is found by the ridge baseline on the same inputs
    assert card["metrics"]["ridge_baseline"]["pooled"]["mae"] < 8.0
    assert "6mm" in card["metrics"]["thick_slice_robustness"]
    assert card["training"]["versions"]["torch"] == torch.__version__.split("+")[0] or \
        card["training"]["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    with open(trained / "work" / "fold0" / "metrics.csv") as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [0, 1, 2]
    assert not (trained / "work" / "fold0" / "checkpoint_latest.pt").exists()


def test_cli_exit_codes(tmp_path):
    assert main([str(tmp_path / "missing.toml")]) == 66
    bad = tmp_path / "bad.toml"
    bad.write_text('family = "nope"\nwork_dir = "w"\n[data]\nbids_dir = "x"\nderivatives = ["y"]\n')
    assert main([str(bad)]) == 64


class _Interrupted(Exception):
    pass


class _StopAfterEpoch1(Trainer):
    def on_epoch_end(self, epoch, train_loss, val):
        super().on_epoch_end(epoch, train_loss, val)
        if epoch == 1:
            raise _Interrupted


def test_resume_after_interrupt_gives_identical_weights(tiny_config):
    plain = load_config(tiny_config("plain", max_epochs=4))
    run_training(plain, folds=[0], export=False)
    cut = load_config(tiny_config("cut", max_epochs=4))
    with pytest.raises(_Interrupted):
        run_training(cut, folds=[0], export=False, trainer_cls=_StopAfterEpoch1)
    latest = cut.work_dir / "fold0" / "checkpoint_latest.pt"
    assert torch.load(latest, weights_only=True)["epoch"] == 2
    run_training(cut, folds=[0], export=False, resume=True)
    a = _weights(plain.work_dir / "fold0" / "checkpoint_final.pt")
    b = _weights(cut.work_dir / "fold0" / "checkpoint_final.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with open(cut.work_dir / "fold0" / "metrics.csv") as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [0, 1, 2, 3]
    # a different seed really gives other weights (the comparison above is not vacuous)
    other = load_config(tiny_config("other", max_epochs=4), ["seed=8"])
    run_training(other, folds=[0], export=False)
    c = _weights(other.work_dir / "fold0" / "checkpoint_final.pt")
    assert not torch.equal(a["features.conv0.weight"], c["features.conv0.weight"])


def test_resume_reuses_the_evaluation_of_a_finished_fold(tiny_config, monkeypatch):
    config = load_config(tiny_config("finished", max_epochs=1))
    first = run_training(config, folds=[0], export=False)["folds"][0]
    evaluation = config.work_dir / "fold0" / "evaluation.json"
    stamp = evaluation.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr("training.families.ModelFamily.evaluate_fold",
                        lambda self, *a, **k: calls.append(a) or {"rows": []})
    again = run_training(config, folds=[0], export=False, resume=True)["folds"][0]
    assert calls == [] and again == first and evaluation.stat().st_mtime_ns == stamp
    # a final checkpoint newer than the evaluation (retrained fold) is evaluated again
    final = config.work_dir / "fold0" / "checkpoint_final.pt"
    os.utime(final, ns=(stamp + 10**9, stamp + 10**9))
    assert run_training(config, folds=[0], export=False, resume=True)["folds"][0] == {"rows": []}
    assert len(calls) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_cpu_processes_match_one_process(tiny_config):
    # instance norm: each sample's forward pass does not depend on the rest of its batch, so
    # 2 ranks x 2 samples with averaged gradients must equal 1 process x 4 samples
    single = load_config(tiny_config("single", norm="instance", max_epochs=2, batch_size=4))
    run_training(single, folds=[0], export=False)
    ddp_cfg = tiny_config("ddp", norm="instance", max_epochs=2, batch_size=4)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         "-m", "training", str(ddp_cfg), "--fold", "0", "--no-export"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_config(ddp_cfg)
    a = _weights(single.work_dir / "fold0" / "checkpoint_final.pt")
    b = _weights(ddp.work_dir / "fold0" / "checkpoint_final.pt")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    with open(single.work_dir / "fold0" / "metrics.csv") as h1, \
            open(ddp.work_dir / "fold0" / "metrics.csv") as h2:
        v1 = [float(r["val_mae"]) for r in csv.DictReader(h1)]
        v2 = [float(r["val_mae"]) for r in csv.DictReader(h2)]
    np.testing.assert_allclose(v2, v1, rtol=1e-4)
    assert "DDP rank 1/2" in proc.stderr


def test_fine_tuning_starts_from_the_shipped_weights(trained, tiny_config):
    card = trained / "models" / "densenet-clinical" / "model_card.json"
    cfg = load_config(tiny_config("ft", max_epochs=1), [f"init_from={card}", "optim.lr=1e-12",
                                                        "export.ridge_baseline=false"])
    run_training(cfg, folds=[1], export=False)
    shipped = torch.load(trained / "models" / "densenet-clinical" / "fold1.pt", weights_only=True)
    tuned = _weights(cfg.work_dir / "fold1" / "checkpoint_final.pt")
    for key, value in shipped.items():
        if key.endswith("weight") or key.startswith("target_"):
            torch.testing.assert_close(tuned[key], value.float(), rtol=0, atol=1e-3, msg=key)


def test_tampered_init_weights_are_refused(trained, tiny_config, tmp_path):
    import shutil

    copy = tmp_path / "models"
    shutil.copytree(trained / "models", copy)
    weights = copy / "densenet-clinical" / "fold0.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    cfg = load_config(tiny_config("bad", max_epochs=1), [f"init_from={copy / 'densenet-clinical'}"])
    with pytest.raises(ModelError, match="fold0.pt"):
        run_training(cfg, folds=[0], export=False)


def test_init_from_a_model_id_card_or_folder(trained, monkeypatch):
    """``init_from`` by id (looked up in BRAINAGE_MODELS_DIR), by card path and by model folder
    all give the card and the checked weights of the files next to the card."""
    from training.run import resolve_init_from

    folder = trained / "models" / "densenet-clinical"
    monkeypatch.setenv("BRAINAGE_MODELS_DIR", str(trained / "models"))
    for init_from in ("densenet-clinical", str(folder / "model_card.json"), str(folder)):
        card, states = resolve_init_from(init_from)
        assert card["id"] == "densenet-clinical" and len(states) == len(card["weights"]) == 3
        for entry, state in zip(card["weights"], states):
            stored = torch.load(folder / entry["file"], weights_only=True)
            assert set(state) == set(stored)
            for key, value in stored.items():
                torch.testing.assert_close(state[key], value.float() if value.is_floating_point()
                                           else value, msg=key)


class _CheckPreciseBatchNorm(Trainer):
    """Checks after every validation that the first batch norm holds the training-set mean."""

    checked = 0

    def validate(self):
        out = super().validate()
        x = np.stack([self.cache.views(r.key)[0] for r in self.train_records]).astype(np.float32)
        with torch.no_grad():
            features = self.network.features.conv0(self._layout(torch.from_numpy(x)[:, None]))
        torch.testing.assert_close(self.network.features.norm0.running_mean,
                                   features.mean(dim=(0, 2, 3, 4)), rtol=1e-4, atol=1e-5)
        type(self).checked += 1
        return out


def test_precise_batchnorm_uses_the_training_set_statistics(tiny_config):
    # batch 4 does not divide the training part: the batches' unequal sizes must be weighted
    cfg = load_config(tiny_config("pbn", max_epochs=2, batch_size=4))
    run_training(cfg, folds=[0], export=False, trainer_cls=_CheckPreciseBatchNorm)
    assert _CheckPreciseBatchNorm.checked == 2


def test_a_stalled_network_is_retrained_from_new_seeds_and_resume_keeps_the_attempts(tiny_config):
    # stall_ratio 0: no validation MAE is below 0 x the mean predictor's, so both restarts happen
    config = load_config(tiny_config("stall", max_epochs=2),
                         ["optim.restart_stalled=2", "optim.stall_ratio=0"])
    run_training(config, folds=[0], export=False)
    fold = config.work_dir / "fold0"
    attempts = [config.work_dir / "fold0-stalled0", config.work_dir / "fold0-stalled1", fold]
    assert all((a / "checkpoint_final.pt").is_file() for a in attempts)
    first_conv = [_weights(a / "checkpoint_final.pt")["features.conv0.weight"] for a in attempts]
    assert not torch.equal(first_conv[0], first_conv[1]) and not torch.equal(first_conv[1], first_conv[2])
    restarts = json.loads((fold / "evaluation.json").read_text())["stalled_restarts"]
    assert [r["seed"] for r in restarts] == [7, 7 + 10_007]
    assert [r["folder"] for r in restarts] == ["fold0-stalled0", "fold0-stalled1"]
    val_maes = [torch.load(a / "checkpoint_best.pt", weights_only=True)["val_mae"] for a in attempts[:2]]
    assert [r["best_val_mae"] for r in restarts] == pytest.approx(val_maes)
    # the first attempt is the plain run: the same seed gives the same weights (stall_ratio
    # 1000: any network beats 1000 x the mean predictor's MAE, so none restarts)
    plain = load_config(tiny_config("unstalled", max_epochs=2),
                        ["optim.restart_stalled=2", "optim.stall_ratio=1000"])
    run_training(plain, folds=[0], export=False)
    assert torch.equal(first_conv[0], _weights(plain.work_dir / "fold0" / "checkpoint_final.pt")
                       ["features.conv0.weight"])
    assert not (plain.work_dir / "fold0-stalled0").exists()
    assert "stalled_restarts" not in json.loads((plain.work_dir / "fold0" / "evaluation.json").read_text())
    # resuming counts the kept attempts and trains nothing again
    stamp = (fold / "checkpoint_final.pt").stat().st_mtime_ns
    run_training(config, folds=[0], export=False, resume=True)
    assert (fold / "checkpoint_final.pt").stat().st_mtime_ns == stamp
    assert json.loads((fold / "evaluation.json").read_text())["stalled_restarts"] == restarts
