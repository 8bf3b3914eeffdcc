"""Shared pytest set-up: CPU only, deterministic, small hypothesis budgets."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import settings

settings.register_profile("kure", max_examples=40, deadline=None, derandomize=True)
settings.load_profile("kure")
