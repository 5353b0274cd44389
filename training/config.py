"""Training configuration: one frozen, validated object read from TOML or YAML.

Relative paths are resolved against the current directory (run from the folder the config was
written for, e.g. the checkout root for the shipped configs); ``$VARS`` and ``~`` are expanded.
Any key can be overridden with ``--set section.key=value`` (TOML value syntax).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from bidsapp.errors import UsageError

__all__ = ["DataConfig", "OptimConfig", "RuntimeConfig", "ExportConfig", "TrainConfig",
           "load_config", "config_from_dict", "apply_overrides"]


def _path(value: Any, name: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise UsageError(f"{name} must be a path, got {value!r}")
    return Path(os.path.expandvars(os.path.expanduser(str(value)))).absolute()


def _positive(value: Any, name: str, kind: type = float, allow_zero: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and int(value) != value):
        raise UsageError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return kind(value)


@dataclass(frozen=True)
class DataConfig:
    """Where the training scans come from and how they are split.

    Attributes
    ----------
    bids_dir : Path
        Raw BIDS dataset (ages and sex from its participants/sessions tables).
    derivatives : tuple of Path
        ``brainage`` participant-level outputs holding ``desc-preproc_T1w`` and
        ``desc-brain_mask`` for each T1w (searched in order).
    participant_labels : tuple of str or None
        Restrict to these participants.
    splits_file : Path or None
        A user-supplied splits JSON; when absent one is created in ``work_dir`` once.
    folds : int
        Number of cross-validation folds.
    val_fraction : float
        Share of *all* participants held out of each fold's training part for early stopping
        and the learning-rate schedule (seed 004: 10 %).
    """

    bids_dir: Path
    derivatives: tuple[Path, ...]
    participant_labels: tuple[str, ...] | None = None
    splits_file: Path | None = None
    folds: int = 5
    val_fraction: float = 0.1


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule and stopping (defaults: seed 004)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.9)
    weight_decay: float = 1e-4
    batch_size: int = 32
    max_epochs: int = 70
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    early_stopping_patience: int = 0
    """Stop after this many epochs without validation improvement (0 = never)."""
    precise_bn: bool = True
    """Before each validation, recompute batch-norm statistics on the un-augmented training
    inputs (the running averages lag far behind in short CPU schedules)."""
    restart_stalled: int = 0
    """Retrain a network that never learned, at most this many times, each time from a new
    seed: its best validation MAE stayed at or above ``stall_ratio`` times that of predicting
    the mean training age for everyone (a network stuck at its output bias)."""
    stall_ratio: float = 0.9


@dataclass(frozen=True)
class RuntimeConfig:
    """Device and execution settings."""

    device: str = "auto"
    amp: bool = True
    """Mixed precision (CUDA only)."""
    deterministic: bool = True
    num_threads: int = 0
    """torch intra-op threads (0 = torch default)."""
    channels_last: bool = False
    """Channels-last memory layout for 3D convolutions (often faster on CPU)."""
    progress: bool = True


@dataclass(frozen=True)
class ExportConfig:
    """What is written to the models folder after cross-validation."""

    model_id: str = ""
    variant: str = ""
    """Short name of the configuration (e.g. ``full`` or ``reduced-cpu``), stated in the card."""
    models_dir: Path = Path("models")
    fp16: str = "auto"
    """``auto`` (fp16 when predictions change < ``fp16_tolerance_years``), ``always``, ``never``."""
    fp16_tolerance_years: float = 0.05
    robustness_spacings_mm: tuple[float, ...] = (5.0, 7.0)
    ridge_baseline: bool = True
    notes: str = ""


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs.

    Attributes
    ----------
    family : str
        Model family (see :func:`training.families.available_families`).
    seed : int
        Seed of the splits, initialisation, shuffling and augmentation.
    work_dir : Path
        Checkpoints, logs, metrics, the input cache and the splits file.
    data, optim, runtime, export
        Sections above.
    model : dict
        Network hyperparameters of the family.
    input : dict
        Input preparation and augmentation parameters of the family.
    init_from : str or None
        Fine-tune from a shipped model id (or a model card path or model folder) instead of
        training from scratch.
    """

    family: str
    work_dir: Path
    data: DataConfig
    seed: int = 0
    model: dict = field(default_factory=dict)
    input: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    init_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (paths as strings)."""
        def convert(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, (tuple, list)):
                return [convert(v) for v in value]
            if isinstance(value, dict):
                return {k: convert(v) for k, v in value.items()}
            return value
        return convert(dataclasses.asdict(self))

    def to_json(self) -> str:
        """Indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "runtime": RuntimeConfig,
             "export": ExportConfig}
_TOP = {"family", "seed", "work_dir", "model", "input", "init_from"} | set(_SECTIONS)


def _check_keys(values: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise UsageError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """Validate a mapping (as read from TOML/YAML) and build a :class:`TrainConfig`.

    Raises
    ------
    UsageError
        Naming the offending key for unknown keys, missing sections or bad values.
    """
    if not isinstance(values, Mapping):
        raise UsageError(f"a training config must be a mapping, got {type(values).__name__}")
    _check_keys(values, _TOP, "the config")
    for key in ("family", "work_dir", "data"):
        if key not in values:
            raise UsageError(f"the config has no '{key}' (required)")
    if not isinstance(values["family"], str):
        raise UsageError(f"family must be a string, got {values['family']!r}")
    sections = {}
    for name, cls in _SECTIONS.items():
        raw = values.get(name, {})
        if not isinstance(raw, Mapping):
            raise UsageError(f"[{name}] must be a table, got {type(raw).__name__}")
        _check_keys(raw, {f.name for f in dataclasses.fields(cls)}, f"[{name}]")
        sections[name] = dict(raw)

    data = sections["data"]
    if "bids_dir" not in data or "derivatives" not in data:
        raise UsageError("[data] needs bids_dir and derivatives")
    derivs = data["derivatives"]
    derivs = [derivs] if isinstance(derivs, (str, os.PathLike)) else list(derivs)
    if not derivs:
        raise UsageError("[data] derivatives must name at least one folder")
    labels = data.get("participant_labels") or None
    data_cfg = DataConfig(
        bids_dir=_path(data["bids_dir"], "data.bids_dir"),
        derivatives=tuple(_path(d, "data.derivatives") for d in derivs),
        participant_labels=tuple(str(x).removeprefix("sub-") for x in labels) if labels else None,
        splits_file=_path(data["splits_file"], "data.splits_file") if data.get("splits_file") else None,
        folds=_positive(data.get("folds", 5), "data.folds", int),
        val_fraction=float(data.get("val_fraction", 0.1)))
    if data_cfg.folds < 2:
        raise UsageError(f"data.folds must be >= 2, got {data_cfg.folds}")
    if not 0 < data_cfg.val_fraction < 0.5:
        raise UsageError(f"data.val_fraction must be in (0, 0.5), got {data_cfg.val_fraction}")

    opt = sections["optim"]
    betas = tuple(float(b) for b in opt.get("betas", (0.9, 0.9)))
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise UsageError(f"optim.betas must be two numbers in [0, 1), got {opt.get('betas')!r}")
    optim_cfg = OptimConfig(
        lr=_positive(opt.get("lr", 1e-4), "optim.lr"), betas=betas,
        weight_decay=_positive(opt.get("weight_decay", 1e-4), "optim.weight_decay", allow_zero=True),
        batch_size=_positive(opt.get("batch_size", 32), "optim.batch_size", int),
        max_epochs=_positive(opt.get("max_epochs", 70), "optim.max_epochs", int),
        plateau_patience=_positive(opt.get("plateau_patience", 5), "optim.plateau_patience", int,
                                   allow_zero=True),
        plateau_factor=_positive(opt.get("plateau_factor", 0.5), "optim.plateau_factor"),
        early_stopping_patience=_positive(opt.get("early_stopping_patience", 0),
                                          "optim.early_stopping_patience", int, allow_zero=True),
        precise_bn=bool(opt.get("precise_bn", True)),
        restart_stalled=_positive(opt.get("restart_stalled", 0), "optim.restart_stalled", int,
                                  allow_zero=True),
        stall_ratio=_positive(opt.get("stall_ratio", 0.9), "optim.stall_ratio", allow_zero=True))
    if not optim_cfg.plateau_factor < 1:
        raise UsageError(f"optim.plateau_factor must be < 1, got {optim_cfg.plateau_factor}")

    run = sections["runtime"]
    device = str(run.get("device", "auto"))
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise UsageError(f"runtime.device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    runtime_cfg = RuntimeConfig(
        device=device, amp=bool(run.get("amp", True)),
        deterministic=bool(run.get("deterministic", True)),
        num_threads=_positive(run.get("num_threads", 0), "runtime.num_threads", int, allow_zero=True),
        channels_last=bool(run.get("channels_last", False)),
        progress=bool(run.get("progress", True)))

    exp = sections["export"]
    fp16 = str(exp.get("fp16", "auto"))
    if fp16 not in ("auto", "always", "never"):
        raise UsageError(f"export.fp16 must be 'auto', 'always' or 'never', got {fp16!r}")
    export_cfg = ExportConfig(
        model_id=str(exp.get("model_id", "") or values["family"]),
        variant=str(exp.get("variant", "")),
        models_dir=_path(exp.get("models_dir", "models"), "export.models_dir"), fp16=fp16,
        fp16_tolerance_years=_positive(exp.get("fp16_tolerance_years", 0.05),
                                       "export.fp16_tolerance_years"),
        robustness_spacings_mm=tuple(_positive(s, "export.robustness_spacings_mm")
                                     for s in exp.get("robustness_spacings_mm", (5.0, 7.0))),
        ridge_baseline=bool(exp.get("ridge_baseline", True)), notes=str(exp.get("notes", "")))

    for name in ("model", "input"):
        if not isinstance(values.get(name, {}), Mapping):
            raise UsageError(f"[{name}] must be a table")
    seed = values.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
    init_from = values.get("init_from") or None
    return TrainConfig(family=values["family"], seed=seed,
                       work_dir=_path(values["work_dir"], "work_dir"), data=data_cfg,
                       model=dict(values.get("model", {})), input=dict(values.get("input", {})),
                       optim=optim_cfg, runtime=runtime_cfg, export=export_cfg,
                       init_from=str(init_from) if init_from else None)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (TOML value syntax; bare words are strings).

    Examples
    --------
    >>> apply_overrides({"optim": {"lr": 1e-4}}, ["optim.lr=0.001", "seed=3"])
    {'optim': {'lr': 0.001}, 'seed': 3}
    """
    out = json.loads(json.dumps(values, default=str))
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        target = out
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise UsageError(f"--set {key}: {part} is not a table")
        target[parts[-1]] = _parse_value(text.strip())
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a TOML (``.toml``) or YAML (``.yml``/``.yaml``) training config.

    Parameters
    ----------
    path : path
        The config file.
    overrides : sequence of str
        ``section.key=value`` items applied on top (see :func:`apply_overrides`).

    Raises
    ------
    InputMissingError
        The file does not exist.
    UsageError
        It cannot be parsed or fails validation.
    """
    from bidsapp.errors import InputMissingError

    path = Path(path)
    if not path.is_file():
        raise InputMissingError(f"training config {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"cannot parse training config {path}: {exc}") from exc
    elif suffix in (".yml", ".yaml"):
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"cannot parse training config {path}: {exc}") from exc
    else:
        raise UsageError(f"training config {path} must end in .toml, .yml or .yaml")
    return config_from_dict(apply_overrides(values or {}, overrides))
