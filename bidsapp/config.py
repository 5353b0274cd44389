"""Run configuration: one frozen, serialisable object holding every setting of a run.

The parser validates the command line and builds a :class:`RunConfig`; workflows and the
runner receive it (or its fields) explicitly, and it is written next to the outputs
(``logs/config-<run_uuid>.json``) so a run can be audited and repeated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__

__all__ = ["MODEL_IDS", "RunConfig", "new_run_uuid"]

#: Model ids of the five seed families (and their ensemble), in report order.
MODEL_IDS = ("local-unet", "diffusion-ae", "mlens", "vgg-cbv", "densenet-clinical", "ensemble")


def new_run_uuid() -> str:
    """``YYYYMMDD-HHMMSS_<uuid4>`` as NiPreps name runs."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}_{uuid.uuid4()}"


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one ``brainage`` invocation (paths absolute)."""

    bids_dir: Path
    output_dir: Path
    analysis_levels: tuple[str, ...]
    work_dir: Path
    participant_labels: tuple[str, ...] | None = None
    session_labels: tuple[str, ...] | None = None
    bids_filters: dict[str, Any] = field(default_factory=dict)
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float | None = None
    models: tuple[str, ...] = ()
    device: str = "cpu"
    cbv_model: Path | None = None
    ddim_steps: int | None = None
    skip_bids_validation: bool = False
    random_seed: int = 0
    vbm_fwhm: float | None = None
    verbosity: int = 0
    run_uuid: str = field(default_factory=new_run_uuid)
    version: str = __version__
    group_options: dict[str, Any] = field(default_factory=dict)
    nipype_plugin: str | None = None
    nipype_plugin_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the settings."""
        out = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            out[item.name] = (str(value) if isinstance(value, os.PathLike)
                              else list(value) if isinstance(value, tuple) else value)
        return out

    def to_json(self) -> str:
        """The settings as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, default=str)

    @property
    def record_path(self) -> Path:
        """Where the run records its settings: ``<output_dir>/logs/config-<run_uuid>.json``."""
        return self.output_dir / "logs" / f"config-{self.run_uuid}.json"

    def record(self) -> Path:
        """Write the settings to :attr:`record_path` (atomically; idempotent).

        Called once the inputs have passed their checks, so that a refused run leaves nothing
        in ``output_dir``.
        """
        from .derivatives import write_json

        if not self.record_path.is_file():
            write_json(self.record_path, self.to_dict())
        return self.record_path

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        """Rebuild a configuration written by :meth:`to_json`."""
        data = json.loads(text)
        for key in ("bids_dir", "output_dir", "work_dir"):
            data[key] = Path(data[key])
        if data.get("cbv_model") is not None:
            data["cbv_model"] = Path(data["cbv_model"])
        for key in ("analysis_levels", "participant_labels", "session_labels", "models"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)
