"""Boutiques descriptor (schema 0.5) of the ``brainage`` command line, built from the parser.

Every input is derived from an argparse action of :func:`bidsapp.cli.parser.build_parser`
and every error code from :data:`bidsapp.cli.parser.EXIT_CODES`, so the descriptor cannot
drift from the real command line.  ``brainage --boutiques`` prints it; the copy shipped as
``bidsapp/data/boutiques.json`` is checked against it by the tests.

The command line follows the BIDS-Apps template that ``bosh validate --bids`` checks
(``mkdir -p [OUTPUT_DIR]; brainage [BIDS_DIR] [OUTPUT_DIR] [ANALYSIS_LEVEL]
[PARTICIPANT_LABEL] [SESSION_LABEL] …``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import __version__

__all__ = ["build_descriptor", "descriptor_json", "SHIPPED_DESCRIPTOR"]

#: The generated descriptor as shipped with the package.
SHIPPED_DESCRIPTOR = Path(__file__).resolve().parents[1] / "data" / "boutiques.json"

# Values that the parser checks after parsing (so that a bad value gets its documented exit
# code, not argparse's 2) and that therefore carry no argparse ``choices``.
_LATE_CHOICES = {"analysis_level": ("participant", "group")}
# Path arguments that the app creates rather than reads: Boutiques type String, not File.
_CREATED_PATHS = {"work_dir"}


def _input_id(action: argparse.Action) -> str:
    """Boutiques id: the first long flag (``--no-tfce`` -> ``no_tfce``) or the positional's dest."""
    if not action.option_strings:
        return action.dest
    longs = [s for s in action.option_strings if s.startswith("--")]
    return (longs[0] if longs else action.option_strings[0]).lstrip("-").replace("-", "_")


def _flag(action: argparse.Action) -> str:
    """The spelling used on the generated command line: the first long, hyphenated flag."""
    longs = [s for s in action.option_strings if s.startswith("--")]
    return longs[0] if longs else action.option_strings[0]


def _is_flag(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                               argparse._CountAction, argparse._StoreConstAction))


def _input(action: argparse.Action, model_ids: tuple[str, ...]) -> dict[str, Any]:
    ident = _input_id(action)
    entry: dict[str, Any] = {"id": ident, "name": _flag(action) if action.option_strings else ident,
                             "value-key": f"[{ident.upper()}]",
                             "optional": bool(action.option_strings)}
    help_text = (action.help or "").replace("%%", "%")
    if isinstance(action, argparse._CountAction):
        help_text += " (a flag here; repeat -v on the command line for more)"
    if help_text:
        entry["description"] = help_text
    if action.option_strings:
        entry["command-line-flag"] = _flag(action)
    if _is_flag(action):
        entry["type"] = "Flag"
        return entry
    if action.type in (int, float):
        entry["type"] = "Number"
        entry["integer"] = action.type is int
    elif action.type is Path and action.dest not in _CREATED_PATHS:
        entry["type"] = "File"
    else:
        entry["type"] = "String"
    choices = action.choices or _LATE_CHOICES.get(action.dest)
    if action.dest == "models":
        choices = ("all", "none", *model_ids)
    if choices:
        entry["value-choices"] = list(choices)
    if action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1:
        entry["list"] = True
        if action.nargs == "+":
            entry["min-list-entries"] = 1
    if action.default is not None and action.default is not argparse.SUPPRESS:
        default = action.default
        entry["default-value"] = list(default) if isinstance(default, (list, tuple)) else default
    return entry


def build_descriptor(parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """The Boutiques descriptor of ``parser`` (default: the ``brainage`` parser).

    Parameters
    ----------
    parser : argparse.ArgumentParser, optional
        Parser to describe; :func:`bidsapp.cli.parser.build_parser` when omitted.

    Returns
    -------
    dict
        A descriptor valid against the Boutiques 0.5 schema.

    Examples
    --------
    >>> desc = build_descriptor()
    >>> desc["schema-version"], desc["container-image"]["image"].startswith("brainage:")
    ('0.5', True)
    """
    from ..config import MODEL_IDS
    from .parser import EXIT_CODES, build_parser

    parser = parser or build_parser()
    from .parser import _BoutiquesAction

    # --help, --version and --boutiques print and exit: they are no inputs of a run
    actions = [a for a in parser._actions if not isinstance(
        a, (argparse._HelpAction, argparse._VersionAction, _BoutiquesAction))]
    inputs = [_input(action, MODEL_IDS) for action in actions]
    by_dest: dict[str, list[str]] = {}
    for action, entry in zip(actions, inputs):
        by_dest.setdefault(action.dest, []).append(entry["id"])
    for action, entry in zip(actions, inputs):
        # options sharing a destination (--tfce/--no-tfce) contradict each other
        others = [i for i in by_dest[action.dest] if i != entry["id"]]
        if others:
            entry["disables-inputs"] = others

    # BIDS-Apps template: the output dir is a String (created by participant) or an existing
    # File (read by group), never both.
    out = next(e for e in inputs if e["id"] == "output_dir")
    out.update(type="String", optional=True)
    existing = {**out, "id": "participant_level_output_dir", "type": "File",
                "name": "output_dir (existing, for group)",
                "description": "output_dir already filled by the participant level (for group)"}
    inputs.insert(inputs.index(out) + 1, existing)

    positional = [e["value-key"] for e in inputs if not e["optional"] or e is out]
    keys = ["[BIDS_DIR]", "[OUTPUT_DIR]", "[ANALYSIS_LEVEL]", "[PARTICIPANT_LABEL]", "[SESSION_LABEL]"]
    rest = [e["value-key"] for e in inputs if e["value-key"] not in keys]
    if positional != keys[:3]:
        raise RuntimeError(f"unexpected positional arguments {positional}")

    groups = []
    for group in parser._action_groups:
        members = [_input_id(a) for a in group._group_actions if a in actions and a.option_strings]
        if members and group.title not in ("positional arguments", "options", "optional arguments"):
            groups.append({"id": group.title.replace(" ", "_") + "_options", "name": group.title.capitalize(),
                           "members": members})
    groups.append({"id": "output_location", "name": "Output location",
                   "description": "a new output dir (participant) or one the participant level "
                                  "filled (group)",
                   "members": ["output_dir", "participant_level_output_dir"],
                   "mutually-exclusive": True, "one-is-required": True})
    return {
        "name": "brainage",
        "tool-version": __version__,
        "schema-version": "0.5",
        "description": parser.description,
        "command-line": "mkdir -p [OUTPUT_DIR]; brainage " + " ".join(keys + rest),
        "container-image": {"type": "docker", "image": f"brainage:{__version__}"},
        "inputs": inputs,
        "groups": groups,
        "output-files": [{"id": "derivatives", "name": "Derivatives dataset",
                          "description": "BIDS-Derivatives dataset: per-participant preprocessed "
                                         "T1w, tissue maps, QC, brain-age tables and reports; "
                                         "group tables and statistics",
                          "path-template": "[OUTPUT_DIR]", "optional": False}],
        "error-codes": [{"code": code, "description": text}
                        for code, text in EXIT_CODES.items() if code != 0],
        "tags": {"domain": ["neuroinformatics", "mri", "brain-age"]},
        "custom": {"BIDSApplicationVersion": "1.0"},
    }


def descriptor_json(parser: argparse.ArgumentParser | None = None) -> str:
    """:func:`build_descriptor` as indented JSON with a final newline (the shipped file's form)."""
    return json.dumps(build_descriptor(parser), indent=2) + "\n"
