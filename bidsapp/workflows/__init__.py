"""nipype workflow factories (``init_*_wf``): per-T1w preprocessing and the participant-level graph."""
