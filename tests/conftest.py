"""Shared pytest set-up: CPU only, 8 simulated devices, deterministic hypothesis budgets, the
compile-flags fixture and the persistent compilation cache fixture of the training-program
tests."""

import os

# Must happen before jax is imported anywhere: sharding tests need several (simulated) devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import pytest
from _training_helpers import xla_optimizations_off
from hypothesis import settings

settings.register_profile("kure", max_examples=40, deadline=None, derandomize=True)
settings.load_profile("kure")


def pytest_configure(config):
    # Under `--dist loadfile` xdist would queue the files by number of tests, which puts the
    # long files with few tests (subprocesses, trainings) last: one worker then runs them alone
    # while the other is idle. The order below is used instead (xdist < 3.6 keeps it anyway).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Runs the test files with ``slow`` tests first (most slow tests first), then the others by
    number of tests, most first; a file's tests keep their order and stay together.

    Longest work first lets the two xdist workers of ``make test`` finish together.
    """
    files = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], []).append(item)

    def cost(tests):
        return (-sum(1 for t in tests if t.get_closest_marker("slow")), -len(tests))

    items[:] = [item for tests in sorted(files.values(), key=cost) for item in tests]


@pytest.fixture(scope="module")
def fast_compiles():
    """Per module, XLA compiles without its optimisation passes (jax_disable_most_optimizations).

    For modules whose run time is compile time (small programs, interpret-mode kernels): every
    number such a module compares is computed under the same setting, so no assertion changes.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("fast_compiles")``, which runs
    it before the module's own fixtures; a single block uses
    ``_training_helpers.xla_optimizations_off()``.
    """
    with xla_optimizations_off():
        yield


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
