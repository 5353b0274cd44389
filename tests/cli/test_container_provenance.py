"""GeneratedBy.Container of dataset_description.json, from the container's environment."""

from __future__ import annotations

import json

import pytest

from bidsapp.cli.participant import _container
from bidsapp.derivatives import write_dataset_description


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"BRAINAGE_CONTAINER_TYPE": "docker", "BRAINAGE_CONTAINER_TAG": "brainage:0.1.0"},
     {"Type": "docker", "Tag": "brainage:0.1.0"}),
    # the SIF keeps the Docker image's ENV, but it is the SIF that ran
    ({"BRAINAGE_CONTAINER_TYPE": "docker", "BRAINAGE_CONTAINER_TAG": "brainage:0.1.0",
      "APPTAINER_CONTAINER": "/images/brainage-0.1.0.sif"},
     {"Type": "singularity", "URI": "/images/brainage-0.1.0.sif"}),
    ({"SINGULARITY_CONTAINER": "/images/old.simg"}, {"Type": "singularity", "URI": "/images/old.simg"}),
])
def test_container_from_environment(monkeypatch, tmp_path, tiny_bids, env, expected):
    for var in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER", "BRAINAGE_CONTAINER_TYPE",
                "BRAINAGE_CONTAINER_TAG"):
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _container() == expected
    desc = json.loads(write_dataset_description(tmp_path / "out", tiny_bids, container=_container()).read_text())
    assert desc["GeneratedBy"][0].get("Container") == expected
