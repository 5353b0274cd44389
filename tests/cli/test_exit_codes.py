"""The command-line contract: every documented exit code for bad invocations, before any work."""

import json

import pytest

from bidsapp.cli.parser import EXIT_CODES, build_parser, parse_args, parse_mem_gb
from bidsapp.cli.run import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_missing_bids_dir_is_66(tmp_path, capsys):
    code, err = _run(capsys, tmp_path / "nope", tmp_path / "out", "participant")
    assert code == 66 and "does not exist" in err and "Traceback" not in err


def test_output_equal_to_or_inside_bids_dir_is_64(tiny_bids, capsys):
    code, err = _run(capsys, tiny_bids, tiny_bids, "participant")
    assert code == 64 and "derivatives" in err
    code, _ = _run(capsys, tiny_bids, tiny_bids / "out", "participant")
    assert code == 64


def test_unknown_level_is_17(tiny_bids, tmp_path, capsys):
    code, err = _run(capsys, tiny_bids, tmp_path / "out", "subject")
    assert code == 17 and "unknown analysis level subject" in err


def test_unknown_participant_is_18(tiny_bids, tmp_path, capsys):
    code, err = _run(capsys, tiny_bids, tmp_path / "out", "participant", "--participant-label", "sub-99",
                     "-w", tmp_path / "work")
    assert code == 18 and "99" in err


def test_filter_matching_nothing_is_18(tiny_bids, tmp_path, capsys):
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"t1w": {"acquisition": "mprage"}}))
    code, err = _run(capsys, tiny_bids, tmp_path / "out", "participant", "--bids_filter_file", filt,
                     "-w", tmp_path / "work")
    assert code == 18 and "mprage" in err


@pytest.mark.parametrize("extra", [["--participant-label", "../01"], ["--models", "resnet"],
                                   ["--nprocs", "0"], ["--mem", "lots"]])
def test_bad_options_are_64(tiny_bids, tmp_path, capsys, extra):
    code, err = _run(capsys, tiny_bids, tmp_path / "out", "participant", *extra)
    assert code == 64 and "Traceback" not in err


def test_cuda_without_gpu_is_64(tiny_bids, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    code, err = _run(capsys, tiny_bids, tmp_path / "out", "participant", "--device", "cuda")
    assert code == 64 and "CUDA" in err


def test_unwritable_output_is_73(tiny_bids, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, err = _run(capsys, tiny_bids, blocker / "out", "participant")
    assert code == 73 and "not writable" in err


def test_invalid_dataset_is_16_with_summary(pediatric_dir, tmp_path, capsys):
    code, err = _run(capsys, pediatric_dir, tmp_path / "out", "participant", "-w", tmp_path / "w")
    assert code == 16 and "24 errors" in err and "--skip-bids-validation" in err


def test_argparse_usage_is_2(capsys):
    assert main(["only-one-arg"]) == 2


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert "brainage v" in capsys.readouterr().out
    text = build_parser().format_help()
    for code in EXIT_CODES:
        assert f"{code:>3}  " in text


def test_labels_and_aliases(tiny_bids, tmp_path):
    cfg = parse_args([str(tiny_bids), str(tmp_path / "o"), "participant", "--participant_label",
                      "sub-02", "01", "02", "--session-label", "ses-A", "--n_cpus", "2",
                      "--omp_nthreads", "1", "--models", "none", "--mem", "8G", "-w", str(tmp_path / "w")])
    assert cfg.participant_labels == ("01", "02") and cfg.session_labels == ("A",)
    assert (cfg.nprocs, cfg.omp_nthreads, cfg.models, cfg.mem_gb) == (2, 1, (), 8.0)


def test_output_under_derivatives_is_allowed(tiny_bids, tmp_path):
    cfg = parse_args([str(tiny_bids), str(tiny_bids / "derivatives" / "brainage"), "group"])
    assert cfg.output_dir == tiny_bids / "derivatives" / "brainage"


def test_mem_units():
    assert parse_mem_gb("8000M") == pytest.approx(8000 / 1024)
    assert parse_mem_gb("1T") == 1024.0


@pytest.mark.parametrize("damage", ["truncate", "4d"])
def test_unusable_image_is_65_and_writes_nothing(tiny_bids, tmp_path, capsys, damage):
    import nibabel as nib
    import numpy as np

    t1w = tiny_bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    if damage == "truncate":
        t1w.write_bytes(t1w.read_bytes()[:300])
    else:
        nib.Nifti1Image(np.ones((10, 10, 10, 3), np.float32), np.eye(4)).to_filename(t1w)
    out = tmp_path / "out"
    code, err = _run(capsys, tiny_bids, out, "participant", "--participant-label", "01",
                     "--skip-bids-validation", "-w", tmp_path / "w")
    assert code == 65 and "sub-01_T1w.nii.gz" in err and "Traceback" not in err
    assert not list(out.glob("sub-*"))


@pytest.mark.parametrize("extra, code, text", [
    (["--nipype-plugin", "NoSuch"], 64, "not a nipype plugin"),
    (["--nipype-plugin-args", "{}"], 64, "needs --nipype-plugin"),
    (["--nipype-plugin", "SLURM", "--nipype-plugin-args", "[1]"], 64, "JSON object"),
    (["--nipype-plugin", "SLURM", "--nipype-plugin-args", "{sbatch_args"], 64, "not valid JSON"),
    (["--nipype-plugin", "SLURM", "--nipype-plugin-args", "@missing.json"], 66, "does not exist"),
])
def test_bad_nipype_plugin_options(tiny_bids, tmp_path, capsys, extra, code, text):
    got, err = _run(capsys, tiny_bids, tmp_path / "out", "participant", *extra)
    assert got == code and text in err and "Traceback" not in err


def test_nipype_plugin_pass_through(tiny_bids, tmp_path):
    from bidsapp.cli.participant import _plugin

    args_file = tmp_path / "plugin.json"
    args_file.write_text('{"sbatch_args": "--partition=short --mem=4G", "max_jobs": 20}')
    cfg = parse_args([str(tiny_bids), str(tmp_path / "o"), "participant", "--nipype_plugin", "slurmgraph",
                      "--nipype-plugin-args", f"@{args_file}", "--nprocs", "4"])
    assert (cfg.nipype_plugin, cfg.nipype_plugin_args) == (
        "SLURMGraph", {"sbatch_args": "--partition=short --mem=4G", "max_jobs": 20})
    assert _plugin(cfg, 3) == ("SLURMGraph", {"sbatch_args": "--partition=short --mem=4G", "max_jobs": 20})
    # MultiProc keeps brainage's defaults; the user's arguments override them
    cfg = parse_args([str(tiny_bids), str(tmp_path / "o"), "participant", "--nipype-plugin", "MultiProc",
                      "--nipype-plugin-args", '{"maxtasksperchild": 4}', "--nprocs", "3", "--mem", "6G"])
    assert _plugin(cfg, 1) == ("MultiProc", {"n_procs": 3, "raise_insufficient": False,
                                             "maxtasksperchild": 4, "memory_gb": 6.0})
    # without the option: Linear for one process, MultiProc otherwise (unchanged)
    cfg = parse_args([str(tiny_bids), str(tmp_path / "o"), "participant", "--nprocs", "1"])
    assert _plugin(cfg, 2) == ("Linear", {}) and cfg.nipype_plugin is None
    assert json.loads(cfg.to_json())["nipype_plugin_args"] == {}
