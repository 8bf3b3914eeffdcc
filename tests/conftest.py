"""Shared pytest set-up: CPU only, 8 simulated devices, deterministic hypothesis budgets."""

import os

# Must happen before jax is imported anywhere: sharding tests need several (simulated) devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

from hypothesis import settings

settings.register_profile("kure", max_examples=40, deadline=None, derandomize=True)
settings.load_profile("kure")
