"""``brainage --boutiques``: a valid Boutiques 0.5 descriptor generated from the real parser."""

from __future__ import annotations

import argparse
import copy
import json
import shlex

import pytest
from boutiques import bosh
from boutiques.bids import validate_bids
from boutiques.validator import DescriptorValidationError, validate_descriptor

from bidsapp import __version__
from bidsapp.cli.boutiques import SHIPPED_DESCRIPTOR, build_descriptor, descriptor_json
from bidsapp.cli.parser import EXIT_CODES, build_parser
from bidsapp.cli.run import main


@pytest.fixture(scope="module")
def descriptor():
    return build_descriptor()


def test_cli_prints_the_descriptor_and_exits_0(capsys):
    for flag in ("--boutiques", "--bids-exec-spec"):
        assert main([flag]) == 0
        assert json.loads(capsys.readouterr().out) == build_descriptor()


def test_valid_against_the_schema_and_the_bids_app_template(descriptor):
    validate_descriptor(copy.deepcopy(descriptor))
    validate_bids(copy.deepcopy(descriptor), valid=True)
    broken = copy.deepcopy(descriptor)
    broken["inputs"][1]["type"] = "Directory"
    with pytest.raises(DescriptorValidationError):
        validate_descriptor(broken)


def test_every_option_and_exit_code_is_listed(descriptor):
    parser = build_parser()
    runnable = [a for a in parser._actions if a.option_strings and a.dest != "help"
                and not isinstance(a, argparse._VersionAction) and "--boutiques" not in a.option_strings]
    flags = {i.get("command-line-flag") for i in descriptor["inputs"]}
    for action in runnable:
        assert flags & set(action.option_strings), action.option_strings
    assert len(flags - {None}) == len(runnable)
    assert {e["code"]: e["description"] for e in descriptor["error-codes"]} == \
        {code: text for code, text in EXIT_CODES.items() if code != 0}
    assert descriptor["tool-version"] == __version__
    assert descriptor["container-image"] == {"type": "docker", "image": f"brainage:{__version__}"}


def test_types_choices_defaults_and_flags(descriptor):
    inputs = {i["id"]: i for i in descriptor["inputs"]}
    assert inputs["bids_dir"]["type"] == "File" and inputs["bids_dir"]["optional"] is False
    assert inputs["analysis_level"]["value-choices"] == ["participant", "group"]
    assert inputs["analysis_level"]["list"] is True
    assert inputs["nprocs"]["type"] == "Number" and inputs["nprocs"]["integer"] is True
    assert inputs["alpha"]["type"] == "Number" and inputs["alpha"]["integer"] is False
    assert inputs["device"]["value-choices"] == ["auto", "cpu", "cuda"]
    assert inputs["device"]["default-value"] == "auto"
    assert inputs["models"]["default-value"] == ["all"] and "none" in inputs["models"]["value-choices"]
    assert inputs["tfce_connectivity"]["value-choices"] == [6, 26]
    assert inputs["skip_bids_validation"]["type"] == "Flag"
    assert inputs["tfce"]["disables-inputs"] == ["no_tfce"]
    assert inputs["work_dir"]["type"] == "String" and inputs["work_dir"]["command-line-flag"] == "--work-dir"


def test_an_invocation_round_trips_through_bosh_and_the_parser(tmp_path, descriptor):
    """What bosh builds from an invocation parses back to the same values."""
    (tmp_path / "desc.json").write_text(json.dumps(descriptor))
    invocation = {"bids_dir": "/data/ds", "output_dir": "/out", "analysis_level": ["participant", "group"],
                  "participant_label": ["01", "02"], "session_label": ["A"], "work_dir": "/scratch/w",
                  "nprocs": 4, "mem": "8G", "models": ["densenet-clinical"], "no_tfce": True,
                  "tfce_connectivity": 26, "alpha": 0.01, "skip_bids_validation": True}
    (tmp_path / "inv.json").write_text(json.dumps(invocation))
    command = bosh(["exec", "simulate", str(tmp_path / "desc.json"),
                    "-i", str(tmp_path / "inv.json")]).shell_command
    mkdir, run = command.split(";", 1)
    assert mkdir.strip() == "mkdir -p /out"
    argv = shlex.split(run)
    assert argv[0] == "brainage"
    args = build_parser().parse_args(argv[1:])
    assert (str(args.bids_dir), str(args.output_dir), args.analysis_level) == \
        ("/data/ds", "/out", ["participant", "group"])
    assert (args.participant_label, args.session_label, str(args.work_dir)) == \
        (["01", "02"], ["A"], "/scratch/w")
    assert (args.nprocs, args.mem, args.models, args.tfce) == (4, "8G", ["densenet-clinical"], False)
    assert (args.tfce_connectivity, args.alpha, args.skip_bids_validation) == (26, 0.01, True)


def test_shipped_descriptor_equals_the_generated_one():
    assert SHIPPED_DESCRIPTOR.read_text(encoding="utf-8") == descriptor_json(), \
        "regenerate: brainage --boutiques > bidsapp/data/boutiques.json"
