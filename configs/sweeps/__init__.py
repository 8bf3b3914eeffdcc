"""Sweep configs of eval.py (``--sweep configs/sweeps/<name>.py``); variants import default."""
