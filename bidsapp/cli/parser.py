"""Command-line parser (BIDS-Apps contract) and its validation into a :class:`RunConfig`.

``build_parser()`` is pure; ``parse_args()`` checks paths and options and raises the typed
errors of :mod:`bidsapp.errors`, which :mod:`bidsapp.cli.run` maps to exit codes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..bids.layout import load_bids_filters, normalise_labels
from ..config import MODEL_IDS, RunConfig
from ..errors import AnalysisLevelError, InputMissingError, NotWritableError, OutputLocationError, UsageError

__all__ = ["build_parser", "parse_args", "EXIT_CODES", "LEVELS"]

LEVELS = ("participant", "group")

#: Exit codes (BEP027 / sysexits), documented in --help and the README.
EXIT_CODES = {
    0: "success",
    1: "some participants failed (the others were processed)",
    2: "usage error (argparse)",
    16: "the input dataset fails BIDS validation",
    17: "unknown analysis level",
    18: "the selection (labels/filters) matched no T1w",
    64: "usage error: contradictory/unknown options, output_dir is bids_dir or inside it",
    65: "unreadable/corrupt/unusable image, unparsable age, unknown phenotype column, bad weights",
    66: "bids_dir missing or not a BIDS dataset, no T1w image, or another input file missing",
    70: "internal error (please report it with the -v output)",
    73: "output or work directory not writable (permissions, read-only file system, disk full)",
    75: "every selected participant is being processed by another brainage run into output_dir; "
        "run again when it ends",
    130: "interrupted (SIGINT/SIGTERM); rerun with the same work dir to resume",
}

_EPILOG = "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def _add(group: argparse._ActionsContainer, *flags: str, **kwargs) -> None:
    """Add an option under its hyphen and underscore spellings (NiPreps accept both)."""
    spellings = list(flags)
    for flag in flags:
        if flag.startswith("--") and "-" in flag[2:]:
            alias = "--" + flag[2:].replace("-", "_")
            if alias not in spellings:
                spellings.append(alias)
    group.add_argument(*spellings, **kwargs)


class _BoutiquesAction(argparse.Action):
    """``--boutiques``: print the Boutiques descriptor of this parser and exit (as --version)."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .boutiques import descriptor_json

        parser._print_message(descriptor_json(parser), sys.stdout)
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (no validation beyond types)."""
    parser = argparse.ArgumentParser(
        prog="brainage",
        description="brainage: brain age from T1-weighted MRI, as a BIDS App. The participant level "
                    "preprocesses each T1w (ANTs N4, deepbet brain mask, registration to "
                    "MNI152NLin2009aSym, GM/WM/CSF, Jacobian-modulated tissue maps) and runs the "
                    "brain-age models; the group level computes bias-corrected gaps and statistics.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bids_dir", type=Path, help="root of the input BIDS dataset")
    parser.add_argument("output_dir", type=Path,
                        help="output (derivatives) directory, e.g. <bids_dir>/derivatives/brainage")
    parser.add_argument("analysis_level", nargs="+", metavar="{participant,group}",
                        help="processing stage(s): 'participant' then 'group' (both may be given)")
    parser.add_argument("--version", action="version", version=f"brainage v{__version__}")
    parser.add_argument("--boutiques", "--bids-exec-spec", action=_BoutiquesAction,
                        help="print the Boutiques descriptor (JSON) of this command line and exit")

    sel = parser.add_argument_group("selecting data")
    _add(sel, "--participant-label", nargs="+", metavar="LABEL",
         help="participant labels (with or without 'sub-'); default: all")
    _add(sel, "--session-label", nargs="+", metavar="LABEL",
         help="session labels (with or without 'ses-'); default: all")
    _add(sel, "--bids-filter-file", type=Path, metavar="FILE",
         help='JSON {"t1w": {entity: value}} overriding the default T1w query '
              '(null = entity absent, "*" = any value)')
    _add(sel, "--skip-bids-validation", action="store_true",
         help="do not run bids-validator-deno on the input")

    perf = parser.add_argument_group("performance")
    _add(perf, "-w", "--work-dir", type=Path, metavar="DIR",
         help="working directory for intermediate results (reruns resume from it); default ./work")
    _add(perf, "--nprocs", "--nthreads", "--n-cpus", type=int, metavar="N",
         help="maximum number of parallel processes (default: all CPUs)")
    _add(perf, "--omp-nthreads", type=int, metavar="N",
         help="threads per process (ANTs/ITK, torch); default min(8, nprocs)")
    _add(perf, "--mem", "--mem-mb", metavar="SIZE",
         help="memory limit for scheduling, with a unit: 8G, 8000M (a bare number means MB)")
    _add(perf, "--device", choices=("auto", "cpu", "cuda"), default="auto",
         help="device for the networks (default auto: CUDA when available)")
    _add(perf, "--nipype-plugin", metavar="NAME",
         help="nipype execution plugin, e.g. MultiProc (default), Linear, LegacyMultiProc, SLURM, "
              "SLURMGraph, SGEGraph, PBSGraph. The cluster plugins submit each workflow node as "
              "a job: they need -w on a shared file system and brainage installed natively "
              "on the compute nodes")
    _add(perf, "--nipype-plugin-args", metavar="JSON",
         help='arguments of the plugin as a JSON object, or @FILE holding one, e.g. '
              '\'{"sbatch_args": "--partition=short --mem=4G", "dont_resubmit_completed_jobs": true}\'')

    mdl = parser.add_argument_group("models")
    _add(mdl, "--models", nargs="+", default=["all"], metavar="ID",
         help=f"models to run: all (default), none (preprocessing only) or ids: {', '.join(MODEL_IDS)}")
    _add(mdl, "--cbv-model", type=Path, metavar="FILE", default=None,
         help="CBV synthesis checkpoint (cbv_synth.pt from 'python -m training.cbv_synth', "
              "trained on your own paired T1w/CBV scans): vgg-cbv then also runs its CBV branch "
              "on the CBV map synthesised from the MNI-space T1w and applies a T1w+CBV stack. "
              "Needs a vgg-cbv model with CBV-branch weights (none ships: no paired data is "
              "public); refused with exit 65 otherwise")
    _add(mdl, "--ddim-steps", type=int, metavar="N", default=None,
         help="DDIM steps (an integer >= 1) of the diffusion-ae reconstruction of the medial "
              "slice (encoding and decoding: 2 N network passes); default: the model card's "
              "value. Fewer steps run faster and reconstruct less exactly")
    _add(mdl, "--vbm-fwhm", type=float, metavar="MM", default=None,
         help="also write smoothed modulated GM/WM maps with this FWHM in mm (e.g. 4)")

    grp = parser.add_argument_group("group level")
    _add(grp, "--analysis", type=Path, metavar="FILE",
         help="JSON file with the group options below (command-line options override it)")
    _add(grp, "--group-column", metavar="COLUMN", help="participants.tsv column holding groups (default group)")
    _add(grp, "--control-label", metavar="LABEL", help="label of the control group (default HC)")
    _add(grp, "--covariates", nargs="+", metavar="COLUMN", help="covariate columns, e.g. age sex")
    _add(grp, "--contrasts", nargs="+", metavar="A-B", help="group contrasts (default: every group vs controls)")
    _add(grp, "--bias-correction", choices=("linear-age", "linear-predicted", "extremes", "agebin", "none"),
         help="brain-age bias correction fitted on controls (default linear-age)")
    _add(grp, "--bias-fit-on", metavar="controls|FILE", help="fit on controls (default) or reuse a stored fit JSON")
    _add(grp, "--n-perm", type=int, metavar="N", help="permutations for voxelwise inference (default 5000)")
    grp.add_argument("--tfce", dest="tfce", action="store_true", default=None, help="TFCE (default)")
    grp.add_argument("--no-tfce", dest="tfce", action="store_false", help="voxelwise max-statistic only")
    _add(grp, "--tfce-steps", choices=("fixed", "per-map"),
         help="TFCE step rule: fixed (FSL randomise, default) or per-map (nilearn)")
    _add(grp, "--tfce-connectivity", type=int, choices=(6, 26), help="TFCE neighbourhood (default 6)")
    _add(grp, "--alpha", type=float, help="significance level (default 0.05)")

    misc = parser.add_argument_group("other")
    _add(misc, "--random-seed", type=int, default=0, metavar="N", help="master random seed (default 0)")
    parser.add_argument("-v", "--verbose", dest="verbosity", action="count", default=0,
                        help="more log output (-vv for debug); tracebacks are shown with -v")
    return parser


def parse_mem_gb(text: str | None) -> float | None:
    """``'8G'`` → 8.0, ``'8000M'`` → 7.8125; a bare number is MB (as fMRIPrep).

    Examples
    --------
    >>> parse_mem_gb("8G"), parse_mem_gb("512M"), parse_mem_gb("2048")
    (8.0, 0.5, 2.0)
    """
    if text is None:
        return None
    match = _MEM_RE.match(str(text))
    if not match:
        raise UsageError(f"--mem {text!r}: give a size with a unit, e.g. 8G or 8000M")
    value, unit = float(match.group(1)), (match.group(2) or "M").upper()
    gb = value * {"K": 1 / 1024 ** 2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}[unit]
    if gb <= 0:
        raise UsageError(f"--mem {text!r} must be positive")
    return gb


def _check_writable(path: Path, what: str) -> None:
    """Probe that ``path`` can be created and written; leave the file system as it was.

    A refused run must not leave empty output or work directories behind, so the folders
    created for the probe are removed again; the run creates them when it starts writing.
    """
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".brainage-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        for folder in created:  # deepest first
            folder.rmdir()
    except OSError as exc:
        raise NotWritableError(f"{what} {path} is not writable ({exc.strerror or exc}); "
                               f"choose a directory you can write to") from exc


def _nipype_plugin(name: str | None, args_text: str | None) -> tuple[str | None, dict]:
    """Validate ``--nipype-plugin``/``--nipype-plugin-args``: nipype's spelling of a plugin
    and its arguments as a dict.

    Examples
    --------
    >>> _nipype_plugin("slurmgraph", '{"dont_resubmit_completed_jobs": true}')
    ('SLURMGraph', {'dont_resubmit_completed_jobs': True})
    >>> _nipype_plugin(None, None)
    (None, {})
    """
    if name is None:
        if args_text is not None:
            raise UsageError("--nipype-plugin-args needs --nipype-plugin")
        return None, {}
    from nipype.pipeline import plugins

    known = {attr[:-len("Plugin")].lower(): attr[:-len("Plugin")] for attr in dir(plugins)
             if attr.endswith("Plugin") and attr != "Plugin"}
    plugin = known.get(name.lower())
    if plugin is None:
        raise UsageError(f"--nipype-plugin {name!r} is not a nipype plugin; use one of "
                         f"{', '.join(sorted(known.values()))}")
    if args_text is None:
        return plugin, {}
    text = args_text
    if args_text.startswith("@"):
        path = Path(args_text[1:]).expanduser()
        if not path.is_file():
            raise InputMissingError(f"--nipype-plugin-args file {path} does not exist")
        text = path.read_text(encoding="utf-8")
    try:
        plugin_args = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--nipype-plugin-args is not valid JSON ({exc}); give an object such as "
                         '\'{"sbatch_args": "--partition=short"}\'') from exc
    if not isinstance(plugin_args, dict):
        raise UsageError("--nipype-plugin-args must be a JSON object ({\"name\": value, ...})")
    if "status_callback" in plugin_args:
        raise UsageError("--nipype-plugin-args: status_callback is set by brainage itself")
    return plugin, plugin_args


def _resolve_models(requested: Sequence[str]) -> tuple[str, ...]:
    names = [m.lower() for m in requested]
    if names in (["all"], ["none"]):
        return ("all",) if names == ["all"] else ()
    unknown = sorted(set(names) - set(MODEL_IDS))
    if unknown or "all" in names or "none" in names:
        raise UsageError(f"--models: unknown or mixed id(s) {', '.join(unknown) or names}; "
                         f"use all, none, or one or more of {', '.join(MODEL_IDS)}")
    return tuple(dict.fromkeys(names))


def _cbv_model(path: Path | None, models: tuple[str, ...]) -> Path | None:
    """Check ``--cbv-model``: an existing file, and vgg-cbv among the models to run.

    Whether the installed vgg-cbv model has a CBV branch is checked by the participant level,
    after the model cards are read (:func:`bidsapp.inference.vgg_cbv.check_cbv_request`).
    """
    if path is None:
        return None
    if models != ("all",) and "vgg-cbv" not in models:
        raise UsageError(f"--cbv-model feeds the CBV branch of vgg-cbv, which --models "
                         f"{' '.join(models) or 'none'} does not run; add vgg-cbv to --models or "
                         "drop --cbv-model")
    path = path.expanduser().absolute()
    if not path.is_file():
        raise InputMissingError(f"--cbv-model file {path} does not exist")
    return path


def _ddim_steps(value: int | None, models: tuple[str, ...]) -> int | None:
    """Check ``--ddim-steps``: an integer >= 1, and diffusion-ae among the models to run.

    Whether the installed diffusion-ae model has that many diffusion timesteps is checked by
    the participant level, after the model cards are read
    (:func:`bidsapp.inference.diffusion_ae.check_ddim_request`).

    Examples
    --------
    >>> _ddim_steps(20, ("all",)), _ddim_steps(None, ())
    (20, None)
    """
    if value is None:
        return None
    if value < 1:
        raise UsageError(f"--ddim-steps must be an integer >= 1 (the DDIM steps of the "
                         f"diffusion-ae reconstruction), got {value}; leave it out for the model "
                         "card's value")
    if models != ("all",) and "diffusion-ae" not in models:
        raise UsageError(f"--ddim-steps sets the reconstruction of diffusion-ae, which --models "
                         f"{' '.join(models) or 'none'} does not run; add diffusion-ae to "
                         "--models or drop --ddim-steps")
    return value


def parse_args(argv: Sequence[str] | None = None) -> RunConfig:
    """Parse and validate the command line.

    Raises
    ------
    SystemExit
        From argparse, for malformed command lines (exit 2).
    UsageError, OutputLocationError, InputMissingError, NotWritableError
        For options that parse but cannot be honoured.
    """
    args = build_parser().parse_args(argv)
    levels = tuple(dict.fromkeys(level.lower() for level in args.analysis_level))
    bad = [level for level in levels if level not in LEVELS]
    if bad:
        raise AnalysisLevelError(f"unknown analysis level {', '.join(bad)}: use participant and/or group")
    bids_dir = args.bids_dir.expanduser().absolute()
    if not bids_dir.is_dir():
        raise InputMissingError(f"bids_dir {bids_dir} does not exist or is not a directory")
    bids_dir = bids_dir.resolve()
    output_dir = args.output_dir.expanduser().absolute().resolve()
    if output_dir == bids_dir or output_dir.is_relative_to(bids_dir) and \
            not output_dir.is_relative_to(bids_dir / "derivatives"):
        raise OutputLocationError(
            f"output_dir {output_dir} is the input dataset or inside it; write elsewhere, e.g. "
            f"{bids_dir / 'derivatives' / f'brainage-{__version__}'}")
    work_dir = (args.work_dir or Path.cwd() / "work").expanduser().absolute().resolve()
    if work_dir.is_relative_to(bids_dir):
        raise OutputLocationError(f"--work-dir {work_dir} is inside bids_dir; use a scratch directory")
    if work_dir.is_relative_to(output_dir):
        raise OutputLocationError(f"--work-dir {work_dir} is inside output_dir; use a separate directory")
    cpus = os.cpu_count() or 1
    nprocs = args.nprocs if args.nprocs is not None else cpus
    if nprocs < 1:
        raise UsageError(f"--nprocs must be >= 1, got {nprocs}")
    omp = args.omp_nthreads if args.omp_nthreads is not None else max(1, min(8, nprocs))
    if omp < 1:
        raise UsageError(f"--omp-nthreads must be >= 1, got {omp}")
    if args.vbm_fwhm is not None and not 0 < args.vbm_fwhm <= 20:
        raise UsageError(f"--vbm-fwhm must be in (0, 20] mm, got {args.vbm_fwhm}")
    device = args.device
    if device != "cpu":
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no CUDA GPU is available "
                             "(use --device auto or cpu)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
    participants = normalise_labels(args.participant_label, "sub")
    sessions = normalise_labels(args.session_label, "ses")
    filters = load_bids_filters(args.bids_filter_file)
    plugin, plugin_args = _nipype_plugin(args.nipype_plugin, args.nipype_plugin_args)
    group_options = {key: value for key, value in (
        ("group_column", args.group_column), ("control_label", args.control_label),
        ("covariates", tuple(args.covariates) if args.covariates else None),
        ("contrasts", tuple(args.contrasts) if args.contrasts else None),
        ("bias_correction", args.bias_correction), ("bias_fit_on", args.bias_fit_on),
        ("n_perm", args.n_perm), ("tfce", args.tfce), ("tfce_steps", args.tfce_steps),
        ("connectivity", args.tfce_connectivity), ("alpha", args.alpha)) if value is not None}
    if args.analysis is not None:
        if not args.analysis.is_file():
            raise InputMissingError(f"--analysis file {args.analysis} does not exist")
        group_options["analysis_file"] = str(args.analysis.absolute())
    if args.n_perm is not None and args.n_perm < 1:
        raise UsageError(f"--n-perm must be >= 1, got {args.n_perm}")
    models = _resolve_models(args.models)
    cbv_model = _cbv_model(args.cbv_model, models) if "participant" in levels else None
    ddim_steps = _ddim_steps(args.ddim_steps, models) if "participant" in levels else None
    _check_writable(output_dir, "output_dir")
    if "participant" in levels:
        _check_writable(work_dir, "--work-dir")
    return RunConfig(
        bids_dir=bids_dir, output_dir=output_dir, analysis_levels=levels, work_dir=work_dir,
        participant_labels=tuple(participants) if participants else None,
        session_labels=tuple(sessions) if sessions else None, bids_filters=filters,
        nprocs=nprocs, omp_nthreads=omp, mem_gb=parse_mem_gb(args.mem),
        models=models, device=device, cbv_model=cbv_model, ddim_steps=ddim_steps,
        skip_bids_validation=args.skip_bids_validation, random_seed=args.random_seed,
        vbm_fwhm=args.vbm_fwhm, verbosity=args.verbosity, group_options=group_options,
        nipype_plugin=plugin, nipype_plugin_args=plugin_args)
