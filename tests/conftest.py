"""Shared pytest set-up: CPU only, 8 simulated devices, deterministic hypothesis budgets, and
the persistent compilation cache fixture of the training-program tests."""

import os

# Must happen before jax is imported anywhere: sharding tests need several (simulated) devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import pytest
from hypothesis import settings

settings.register_profile("kure", max_examples=40, deadline=None, derandomize=True)
settings.load_profile("kure")


@pytest.fixture(scope="module")
def persistent_compilation_cache(tmp_path_factory):
    """Per module, JAX's persistent compilation cache in the session's base temp folder.

    The training-program tests compile the same tiny programs again and again: they keep them
    on disk with ``pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")``.
    Yields the cache folder; restores the previous settings afterwards.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    previous = {
        name: getattr(jax.config, name)
        for name in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    }
    cache = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield cache
    for name, value in previous.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()
