"""HTML quality-control reports and their figures.

:mod:`bidsapp.reports.participant` writes ``sub-<label>.html``; :mod:`bidsapp.reports.figures`
holds the reusable figure helpers (slice mosaics with contours or overlays, SVG/PNG output).
"""

from .participant import (
    find_units,
    generate_participant_report,
    software_versions,
    summarize_units,
    unit_summary,
)

__all__ = [
    "find_units",
    "generate_participant_report",
    "software_versions",
    "summarize_units",
    "unit_summary",
]
