"""brainage: a BIDS App predicting brain age from T1-weighted MRI."""

import os as _os

# nipype checks for updates over the network on import; runs must never touch the network.
_os.environ.setdefault("NIPYPE_NO_ET", "1")

__version__ = "0.1.0"
__all__ = ["__version__"]
