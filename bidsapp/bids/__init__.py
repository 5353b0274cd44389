"""BIDS input: validation, T1w selection, ages and phenotypes."""

from .ages import ScanInfo, lookup_scan_info, to_years
from .layout import DEFAULT_QUERY, T1wUnit, collect_t1w_units, load_bids_filters, normalise_labels
from .validation import validate_dataset

__all__ = ["ScanInfo", "lookup_scan_info", "to_years", "DEFAULT_QUERY", "T1wUnit",
           "collect_t1w_units", "load_bids_filters", "normalise_labels", "validate_dataset"]
