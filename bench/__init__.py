"""GPU benchmark of the whole stack against transformers' monolithic model (see bench/run.py)."""
