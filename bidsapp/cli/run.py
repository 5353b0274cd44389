"""``brainage`` entry point: runs the levels and maps every typed error to its exit code.

This is the only module that decides exit codes (see :data:`bidsapp.cli.parser.EXIT_CODES`).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

from .. import errors as err
from ..config import RunConfig

__all__ = ["main", "exit_code_for"]

LOGGER = logging.getLogger("brainage")

_EXIT = (  # most specific first
    (err.AnalysisLevelError, 17),
    (err.BIDSValidationError, 16),
    (err.EmptySelectionError, 18),
    (err.OutputLocationError, 64),
    (err.UsageError, 64),
    (err.ImageError, 65),
    (err.AgeError, 65),
    (err.PhenotypeError, 65),
    (err.ModelError, 65),
    (err.InputMissingError, 66),
    (err.NotWritableError, 73),
    (err.ParticipantBusyError, 75),
    (err.ParticipantFailure, 1),
)


class _Terminated(BaseException):
    """Raised in the main process when SIGTERM arrives, so clean-up runs as for Ctrl-C."""


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT), raised by our handler so that the run also records the request."""


_TERMINATION = {"requested": False}


def termination_requested() -> bool:
    """Whether SIGTERM or SIGINT arrived during this run.

    nipype turns an exception raised inside a node, even this BaseException, into a node
    failure and goes on with the other nodes. The participant level asks here before each
    node starts, so a signalled run stops at once and exits 130 rather than 1. The flag, not
    the exception that surfaces, decides the exit code: a signal that lands inside a lazy
    import can leave a module half-initialised, and the next node then fails with an
    unrelated ``AttributeError``.
    """
    return _TERMINATION["requested"]


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code of an exception raised during a run.

    Examples
    --------
    >>> exit_code_for(err.EmptySelectionError("x"))
    18
    >>> exit_code_for(RuntimeError("bug"))
    70
    >>> exit_code_for(OSError(errno.ENOSPC, "No space left on device"))
    73
    """
    if isinstance(exc, (KeyboardInterrupt, _Terminated)):
        return 130
    if isinstance(exc, PermissionError) and not isinstance(exc, err.BrainageError):
        return 73
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return 73  # a full disk or quota, a read-only file system: nothing the app can fix
    for cls, code in _EXIT:
        if isinstance(exc, cls):
            return code
    return 70


def _setup_logging(verbosity: int) -> None:
    level = max(25 - 5 * verbosity, logging.DEBUG)
    logging.addLevelName(25, "IMPORTANT")
    logging.basicConfig(level=level, format="%(asctime)s | %(levelname)-8s | %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    # nipype has handlers of its own and is chatty at INFO: warnings only unless -vv, no duplicates.
    from nipype import config as nipype_config, logging as nipype_logging

    nipype_level = "INFO" if verbosity >= 2 else "WARNING"
    nipype_config.update_config({"logging": {"workflow_level": nipype_level,
                                             "interface_level": nipype_level,
                                             "utils_level": nipype_level}})
    nipype_logging.update_logging(nipype_config)
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).propagate = False


def _set_thread_env(omp_nthreads: int, seed: int) -> None:
    """Threads and seeds for every child process (ANTs/ITK, BLAS, torch)."""
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(omp_nthreads)
    os.environ["ANTS_RANDOM_SEED"] = str(seed)


def run(config: RunConfig) -> None:
    """Run the requested levels; raise typed errors for the caller to map."""
    # the participant level records the settings itself, after its input checks
    if "participant" in config.analysis_levels:
        from .participant import run_participant_level

        run_participant_level(config)
    if "group" in config.analysis_levels:
        from .group import run_group

        run_group(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``brainage``; returns (and exits with) the documented exit code."""
    from .parser import parse_args

    verbosity = sum(a.count("v") for a in (argv or sys.argv[1:]) if a.startswith("-v")
                    and set(a[1:]) == {"v"}) + (1 if "--verbose" in (argv or sys.argv[1:]) else 0)
    _setup_logging(verbosity)
    def _on_signal(signum, frame):
        _TERMINATION["requested"] = True
        raise _Terminated() if signum == signal.SIGTERM else _Interrupted()

    _TERMINATION["requested"] = False
    # only where nobody (a test runner, an embedding program) installed a handler of its own
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_signal)
    start = time.monotonic()
    try:
        config = parse_args(argv)
        _set_thread_env(config.omp_nthreads, config.random_seed)
        run(config)
    except SystemExit as exc:  # argparse (--help, --version, usage errors)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        return _finish(code, argv)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line + exit code
        code = 130 if termination_requested() else exit_code_for(exc)
        message = str(exc) or type(exc).__name__
        if code == 130:
            message = "interrupted: finished files are kept, nothing half-written; rerun to resume"
        elif code == 70:
            message = (f"internal error ({type(exc).__name__}: {exc}); rerun with -v for the "
                       "traceback and report it")
        LOGGER.error(message, exc_info=verbosity > 0 and code not in (130,))
        return _finish(code, argv)
    LOGGER.log(25, "brainage finished in %.1f s", time.monotonic() - start)
    return _finish(0, argv)


def _finish(code: int, argv: Sequence[str] | None) -> int:
    if argv is None:  # console script
        sys.exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    main()
