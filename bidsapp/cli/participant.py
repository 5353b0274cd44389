"""The participant level: select T1w images, build and run the workflow, write reports."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from ..bids.layout import T1wUnit, collect_t1w_units
from ..bids.validation import validate_dataset
from ..config import RunConfig
from ..errors import ImageError, ParticipantBusyError, ParticipantFailure
from ..locking import ParticipantLocks

__all__ = ["run_participant_level"]

LOGGER = logging.getLogger("brainage")


def _preflight(units: list[T1wUnit]) -> tuple[list[T1wUnit], list[tuple[T1wUnit, str]]]:
    """Check every image before any work, so unusable inputs fail fast with one clear line."""
    from ..anat.checks import check_t1w

    good, bad = [], []
    for unit in units:
        try:
            check_t1w(unit.path)
        except ImageError as exc:
            bad.append((unit, str(exc)))
        else:
            good.append(unit)
    return good, bad


def _flag_age_range(units: list[T1wUnit], cards: dict[str, dict]) -> None:
    """Warn (log and QC file) where a chronological age lies outside a model's training ages.

    The prediction is still made: it is an extrapolation, and the flag says so.
    """
    from ..inference.registry import training_age_range

    for model, card in cards.items():
        ages = training_age_range(card)
        if ages is None:
            continue
        for unit in units:
            age = unit.info.age
            if age is not None and not ages[0] <= age <= ages[1]:
                unit.info.warnings.append(
                    f"age {age:.1f} y is outside the ages {model} was trained on ({ages[0]:g}-"
                    f"{ages[1]:g} y): its brain age is an extrapolation; interpret it with care")


def _plugin(config: RunConfig, n_units: int) -> tuple[str, dict]:
    """The nipype plugin and its arguments: ``--nipype-plugin`` when given, else Linear for one
    process and MultiProc otherwise. ``--nipype-plugin-args`` override the defaults."""
    plugin = config.nipype_plugin
    if plugin is None:
        serial = config.nprocs == 1 or n_units == 1 and config.nprocs <= config.omp_nthreads
        plugin = "Linear" if serial else "MultiProc"
    args: dict = {}
    if plugin in ("MultiProc", "LegacyMultiProc"):
        args = {"n_procs": config.nprocs, "raise_insufficient": False, "maxtasksperchild": 1}
        if config.mem_gb:
            args["memory_gb"] = config.mem_gb
    return plugin, {**args, **config.nipype_plugin_args}


def _container() -> dict[str, str] | None:
    """``GeneratedBy.Container`` of a run inside the brainage image, from the environment:
    Apptainer/Singularity names the image file; the Docker image sets BRAINAGE_CONTAINER_*."""
    for var in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER"):
        if os.environ.get(var):
            return {"Type": "singularity", "URI": os.environ[var]}
    if os.environ.get("BRAINAGE_CONTAINER_TYPE") and os.environ.get("BRAINAGE_CONTAINER_TAG"):
        return {"Type": os.environ["BRAINAGE_CONTAINER_TYPE"], "Tag": os.environ["BRAINAGE_CONTAINER_TAG"]}
    return None


def _crashed_units(crash_root: Path, units: list[T1wUnit]) -> dict[str, list[Path]]:
    """Crash files of this run, grouped by the unit whose workflow produced them."""
    found: dict[str, list[Path]] = defaultdict(list)
    if not crash_root.is_dir():
        return found
    for crash in crash_root.glob("crash-*"):
        for unit in units:
            if re.search(rf"\b{re.escape(unit.source.unit_id)}_wf\b", crash.read_text(errors="replace")):
                found[unit.source.unit_id].append(crash)
                break
    return found


def _crash_message(crash: Path) -> str:
    """The last meaningful line of a nipype crash file (the exception text)."""
    lines = [ln.strip() for ln in crash.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line):
            return line
    return lines[-1] if lines else "unknown error"


def run_participant_level(config: RunConfig) -> None:
    """Preprocess (and later predict) every selected T1w into ``config.output_dir``.

    Raises
    ------
    BIDSValidationError, EmptySelectionError, InputMissingError, ImageError, AgeError, ModelError
        Before any processing starts (a ``--cbv-model`` that the installed vgg-cbv model
        cannot use is a ModelError).
    UsageError
        Before any processing starts: a ``--ddim-steps`` beyond the diffusion timesteps of the
        installed diffusion-ae model.
    ParticipantBusyError
        When another run holds every selected participant (see :mod:`bidsapp.locking`).
    ParticipantFailure
        When some T1w images failed, or were held by another run, while others were processed.
    """
    from ..inference import resolve_models
    from ..inference.registry import verify_models

    if not config.skip_bids_validation:
        validate_dataset(config.bids_dir)
    units = collect_t1w_units(config.bids_dir, participant_labels=config.participant_labels,
                              session_labels=config.session_labels, query=config.bids_filters)
    models = resolve_models(config.models)
    cards = verify_models(models)
    if config.cbv_model is not None:
        from ..inference.registry import models_dir
        from ..inference.vgg_cbv import check_cbv_request

        check_cbv_request(cards.get("vgg-cbv"), config.cbv_model, models_dir())
    if config.ddim_steps is not None:
        from ..inference.diffusion_ae import check_ddim_request
        from ..inference.registry import models_dir

        check_ddim_request(cards.get("diffusion-ae"), config.ddim_steps, models_dir())
    _flag_age_range(units, cards)
    for unit in units:
        for warning in unit.info.warnings:
            LOGGER.warning("%s: %s", unit.relpath, warning)
    good, bad = _preflight(units)
    if len(bad) == 1 and not good:
        raise ImageError(bad[0][1])
    for _, message in bad:
        LOGGER.error("%s", message)
    if not good:
        raise ImageError(f"none of the {len(bad)} selected T1w images is usable (see messages above)")
    with ParticipantLocks(config.output_dir, config.run_uuid) as locks:
        busy = locks.acquire(sorted({u.source.subject for u in units}))
        if busy:
            units, good, bad = _without_busy(busy, units, good, bad)
        _process(config, units, good, bad, models, busy)


def _without_busy(busy: dict[str, str], units, good, bad):
    """Drop the participants another run is writing; refuse the run if none is left."""
    for message in busy.values():
        LOGGER.error("%s", message)
    units = [u for u in units if u.source.subject not in busy]
    if not any(u.source.subject not in busy for u in good):
        raise ParticipantBusyError(
            next(iter(busy.values())) if len(busy) == 1 and not units else
            f"{len(busy)} selected participant(s) are being processed by other brainage runs and "
            f"the others have no usable T1w (listed above); nothing was written")
    return (units, [u for u in good if u.source.subject not in busy],
            [(u, m) for u, m in bad if u.source.subject not in busy])


def _process(config: RunConfig, units: list[T1wUnit], good: list[T1wUnit],
             bad: list[tuple[T1wUnit, str]], models: tuple[str, ...], busy: dict[str, str]) -> None:
    """Run the workflow on the usable T1w images of the locked participants, then the reports."""
    from ..derivatives import write_bidsignore, write_dataset_description
    from ..workflows.base import init_brainage_wf

    LOGGER.log(25, "processing %d T1w image(s) of %d participant(s) with %d process(es); models: %s",
               len(good), len({u.source.subject for u in good}), config.nprocs,
               ", ".join(models) or "none (preprocessing only)")
    config.record()
    write_dataset_description(config.output_dir, config.bids_dir, container=_container())
    write_bidsignore(config.output_dir)

    crash_root = config.work_dir / "crash" / config.run_uuid
    workflow = init_brainage_wf(units=good, output_dir=config.output_dir, work_dir=config.work_dir,
                                omp_nthreads=config.omp_nthreads, random_seed=config.random_seed,
                                vbm_fwhm=config.vbm_fwhm, models=models, device=config.device,
                                cbv_model=config.cbv_model, ddim_steps=config.ddim_steps)
    workflow.config["execution"].update({
        "crashdump_dir": str(crash_root), "crashfile_format": "txt", "stop_on_first_crash": False,
        "remove_unnecessary_outputs": False, "parameterize_dirs": False,
        # inputs are recognised by content, not modification time: a dataset re-fetched by
        # DataLad, restored or re-mounted at the same path keeps its cache (md5 of a T1w < 0.1 s)
        "hash_method": "content"})
    plugin, plugin_args = _plugin(config, len(good))
    progress = tqdm(total=len(good), desc="brainage participant", unit="T1w", disable=None)

    from .run import _Terminated, termination_requested

    def _on_status(node, status):  # nipype calls this as nodes start/end/fail
        if status == "start" and termination_requested():
            raise _Terminated()  # outside nipype's per-node exception handling: the run stops
        if node.name == "ds_anat" and status == "end":
            progress.update(1)

    plugin_args["status_callback"] = _on_status
    try:
        workflow.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as exc:  # nipype: "Workflow did not execute cleanly"
        LOGGER.debug("workflow reported failures: %s", exc)
    finally:
        progress.close()
    crashes = _crashed_units(crash_root, good)
    errors_by_subject: dict[str, list[str]] = defaultdict(list)
    for unit, message in bad:
        errors_by_subject[unit.source.subject].append(message)
    for unit in good:
        for crash in crashes.get(unit.source.unit_id, []):
            message = f"{unit.relpath}: {_crash_message(crash)}"
            errors_by_subject[unit.source.subject].append(message)
            LOGGER.error("%s (details: %s)", message, _keep_crash(crash, unit, config))
    failed_reports = _write_reports(config, units, errors_by_subject)
    failed = len(bad) + len(crashes)
    if failed or failed_reports or busy:
        held = f", {len(busy)} participant(s) were left to another run" if busy else ""
        raise ParticipantFailure(f"{failed} of {len(units)} T1w image(s) and {failed_reports} report(s) "
                                 f"failed{held} (listed above); the rest is in {config.output_dir}")


def _keep_crash(crash: Path, unit: T1wUnit, config: RunConfig) -> Path:
    """Copy a crash file to ``sub-<l>/log/<run_uuid>/`` of the outputs (as fMRIPrep does)."""
    dest = config.output_dir / f"sub-{unit.source.subject}" / "log" / config.run_uuid / crash.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(crash, dest)
    return dest


def _report_job(output_dir: Path, subject: str, run_uuid: str, methods: str, errors: list[str],
                sources: list) -> str:
    from ..reports import generate_participant_report

    return str(generate_participant_report(output_dir, subject, run_uuid=run_uuid, methods=methods,
                                           errors=errors, units=sources))


def _write_reports(config: RunConfig, units: list[T1wUnit], errors: dict[str, list[str]]) -> int:
    """One HTML report per participant (in parallel); returns how many could not be written."""
    from concurrent.futures import ProcessPoolExecutor

    from ..workflows.anatomical import init_anat_preproc_wf

    methods = init_anat_preproc_wf(omp_nthreads=1, vbm_fwhm=config.vbm_fwhm).__desc__ or ""
    subjects = sorted({u.source.subject for u in units})
    failed = 0
    with ProcessPoolExecutor(max_workers=max(1, min(config.nprocs, len(subjects)))) as pool:
        jobs = {subject: pool.submit(_report_job, config.output_dir, subject, config.run_uuid, methods,
                                     errors.get(subject, []),
                                     [u.source for u in units if u.source.subject == subject])
                for subject in subjects}
        for subject, job in tqdm(jobs.items(), desc="reports", unit="participant", disable=None):
            try:
                LOGGER.info("report: %s", job.result())
            except Exception as exc:  # noqa: BLE001 - a report failure must not hide the results
                failed += 1
                LOGGER.error("sub-%s: the HTML report could not be written (%s)", subject, exc)
    return failed
