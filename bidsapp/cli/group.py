"""The group level: read what participant jobs wrote and run the group statistics."""

from __future__ import annotations

import dataclasses
import logging

from ..config import RunConfig

__all__ = ["run_group"]

LOGGER = logging.getLogger("brainage")


def run_group(config: RunConfig) -> None:
    """Build :class:`bidsapp.group.GroupOptions` from the run configuration and run it."""
    from ..group import GroupOptions, run_group_level

    config.record()  # output_dir already holds the participant outputs
    overrides = dict(config.group_options)
    analysis_file = overrides.pop("analysis_file", None)
    options = GroupOptions.from_json(analysis_file) if analysis_file else GroupOptions()
    options = dataclasses.replace(options, **overrides)
    result = run_group_level(config.bids_dir, config.output_dir, options,
                             random_seed=config.random_seed, nprocs=config.nprocs)
    LOGGER.log(25, "group level done: %s", getattr(result, "summary", result))
