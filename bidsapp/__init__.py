"""brainage: a BIDS App predicting brain age from T1-weighted MRI."""

__version__ = "0.1.0"
__all__ = ["__version__"]
