"""Nipype interfaces of brainage (import the submodules: :mod:`.anat`, :mod:`.bids`, :mod:`.models`)."""

__all__: list[str] = []
