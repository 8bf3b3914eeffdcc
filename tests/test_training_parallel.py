"""Data parallelism: one device, jit over an 8-device mesh and pmap over 8 devices agree.

tests/conftest.py forces 8 CPU devices before JAX is imported.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _training_helpers import load_config

from kure_jax.data import get_dataset
from kure_jax.data.base import process_slice
from kure_jax.training import (
    MeshParallel,
    PmapParallel,
    build_model,
    create_train_state,
    make_optimizer,
    make_parallel,
    make_schedule,
    make_state_eval_step,
    make_train_step,
    step_config,
    train_and_evaluate,
)
from kure_jax.training.parallel import DATA_AXIS

NUM_STEPS = 3

pytestmark = [
    pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (forced CPU) devices"),
    # Compile time dominates (three steps); both sides of each comparison use the same setting.
    pytest.mark.usefixtures("persistent_compilation_cache", "fast_compiles"),
]


@pytest.fixture(scope="module")
def config():
    return load_config("mnist5k_kure", "tiny")


@pytest.fixture(scope="module")
def batches(config):
    dataset = get_dataset(config.dataset)
    iterator = dataset.train_batches(seed=0, start_step=0, global_batch_size=config.batch_size)
    return [next(iterator) for _ in range(NUM_STEPS)]


@pytest.fixture(scope="module")
def initial_state(config):
    # The parameters do not depend on bn_axis_name: one init serves every strategy.
    tx = make_optimizer(config, make_schedule(config, steps_per_epoch=125, num_steps=NUM_STEPS))
    model = build_model(config, axis_name=None)
    return create_train_state(model, rng=jax.random.key(0), input_shape=(28, 28, 1), tx=tx)


def run(config, batches, initial_state, parallel, *, bn_axis_name="default"):
    """NUM_STEPS training steps; returns (losses, final state with replicated arrays)."""
    axis = parallel.axis_name if bn_axis_name == "default" else bn_axis_name
    model = build_model(config, axis_name=axis)
    spec = step_config(config, model, (28, 28, 1), axis_name=parallel.axis_name)
    step = parallel.compile_train_step(make_train_step(model, spec))
    # A copy: the step donates its input, which may alias the fixture's buffers.
    state = parallel.place_state(jax.tree.map(jnp.copy, initial_state))
    losses = []
    for batch in batches:
        state, metrics = step(state, parallel.place_batch(batch))
        losses.append(parallel.metrics_to_host(metrics)["loss"])
    return np.array(losses), parallel.canonical_state(state)


@pytest.fixture(scope="module")
def single(config, batches, initial_state):
    return run(config, batches, initial_state, MeshParallel(jax.devices()[:1]))


def assert_states_close(actual, expected):
    for name in ("params", "batch_stats", "opt_state"):
        got, want = getattr(actual, name), getattr(expected, name)
        jax.tree.map(
            lambda a, b, n=name: np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6, err_msg=n
            ),
            got,
            want,
        )
    assert int(actual.step) == int(expected.step) == NUM_STEPS


@pytest.mark.parametrize("kind", ["jit", "pmap"])
def test_eight_devices_match_one_device(config, batches, initial_state, single, kind):
    losses, state = run(config, batches, initial_state, make_parallel(kind))
    ref_losses, ref_state = single
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert not np.allclose(losses[0], losses[-1])  # training moved, so the check is not vacuous
    assert_states_close(state, ref_state)


def test_pmap_needs_synchronised_batch_norm(config, batches, initial_state, single):
    # Negative control: per-device BatchNorm statistics (no bn_axis_name) change the result,
    # so the equality above really relies on the cross-device averaging.
    losses, _ = run(config, batches, initial_state, PmapParallel(), bn_axis_name=None)
    assert not np.allclose(losses[1:], single[0][1:], rtol=1e-4)


def test_mesh_shards_batch_and_replicates_state(config, batches):
    parallel = MeshParallel()
    placed = parallel.place_batch(batches[0])
    assert placed["image"].shape == (config.batch_size, 28, 28, 1)
    assert placed["image"].sharding.spec == jax.sharding.PartitionSpec(DATA_AXIS)
    shards = placed["label"].addressable_shards
    assert len(shards) == 8 and all(s.data.shape == (config.batch_size // 8,) for s in shards)
    np.testing.assert_array_equal(np.asarray(placed["label"]), batches[0]["label"])
    state = parallel.place_state({"w": np.ones(3, np.float32)})
    assert state["w"].sharding.is_fully_replicated


def test_pmap_batch_layout(config, batches):
    placed = PmapParallel().place_batch(batches[0])
    assert placed["image"].shape == (8, config.batch_size // 8, 28, 28, 1)
    np.testing.assert_array_equal(np.asarray(placed["label"]).reshape(-1), batches[0]["label"])
    with pytest.raises(ValueError, match="does not split over 8 devices"):
        PmapParallel().place_batch({"x": np.zeros((12, 2))})


@pytest.mark.parametrize("kind", ["jit", "pmap"])
def test_eval_sums_are_global(config, initial_state, kind):
    parallel = make_parallel(kind)
    model = build_model(config, axis_name=parallel.axis_name)
    state = initial_state
    spec = step_config(config, model, (28, 28, 1), axis_name=parallel.axis_name)
    eval_step = parallel.compile_eval_step(make_state_eval_step(model, spec))
    batch = next(get_dataset("mnist5k").eval_batches(global_batch_size=200))
    batch["mask"][150:] = 0.0
    sums = eval_step(parallel.place_state(state), parallel.place_batch(batch))
    sums = parallel.metrics_to_host(sums)
    # Independent reference: the unsharded model on the 150 unmasked rows.
    logits = model.apply(state.variables, batch["image"][:150], train=False)
    correct = np.sum(np.argmax(np.asarray(logits), -1) == batch["label"][:150])
    assert sums["count"] == 150
    assert sums["correct"] == correct


def test_process_slices_partition_the_global_batch():
    rows = [process_slice(32, i, 4) for i in range(4)]
    covered = np.concatenate([np.arange(32)[r] for r in rows])
    np.testing.assert_array_equal(covered, np.arange(32))
    dataset = get_dataset("mnist5k", max_shift=2)  # augmentation must not depend on processes
    whole = next(dataset.train_batches(seed=3, start_step=7, global_batch_size=32))
    parts = [
        next(dataset.train_batches(
            seed=3, start_step=7, global_batch_size=32, process_index=i, process_count=4
        ))
        for i in range(4)
    ]
    for key in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        process_slice(30, 0, 4)
    with pytest.raises(ValueError, match="process_index"):
        process_slice(32, 4, 4)


@pytest.mark.slow
def test_checkpoints_move_between_pmap_and_jit(config, tmp_path):
    # The checkpoint holds one (unreplicated) copy of the state, whatever wrote it: a run
    # interrupted under pmap resumes under jit and ends where a jit-only run ends.
    config = config.copy_and_resolve_references()
    config.num_train_steps, config.parallel = 6, "pmap"
    train_and_evaluate(config, tmp_path / "mixed", stop_at_step=3)
    config.parallel = "jit"
    mixed = train_and_evaluate(config, tmp_path / "mixed")
    straight = train_and_evaluate(config, tmp_path / "straight")
    assert int(mixed.state.step) == int(straight.state.step) == 6
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6),
        mixed.state.params,
        straight.state.params,
    )
