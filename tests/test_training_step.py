"""Training program: loss/metrics of train_step against NumPy, optimizer, schedules, configs,
the data interface and the train.py command line."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _references import np_cross_entropy, np_kurtosis
from _training_helpers import ROOT, load_config

from kure_jax.data import DATASET_NAMES, Dataset, InMemoryDataset, get_dataset
from kure_jax.training import (
    build_model,
    create_train_state,
    make_optimizer,
    make_schedule,
    make_state_eval_step,
    make_train_step,
    step_config,
    train_and_evaluate,
    validate_config,
)

SHAPE = (28, 28, 1)

pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")


@pytest.fixture(scope="module")
def dataset():
    return get_dataset("mnist5k")


@pytest.fixture(scope="module")
def batch(dataset):
    return next(dataset.train_batches(seed=0, start_step=0, global_batch_size=32))


@pytest.fixture(scope="module")
def initial_state():
    config = load_config("mnist5k_kure", "tiny")
    tx = make_optimizer(config, make_schedule(config, steps_per_epoch=125, num_steps=10))
    model = build_model(config, axis_name=None)
    return create_train_state(model, rng=jax.random.key(0), input_shape=SHAPE, tx=tx)


def make_state(config, initial_state):
    """``initial_state`` (same tiny model) with the optimizer of ``config``."""
    tx = make_optimizer(config, make_schedule(config, steps_per_epoch=125, num_steps=10))
    return initial_state.replace(tx=tx, opt_state=tx.init(initial_state.trainable))


# ------------------------------------- NumPy references: np_kurtosis, np_cross_entropy in
# tests/_references.py


SELECTED = {"kernels": ("stem_conv", "conv1", "hidden", "head"), "paper": ("conv1", "hidden")}


@pytest.mark.parametrize(
    ("lam", "smoothing", "selection"),
    [(0.0, 0.0, "kernels"), (1.0, 0.1, "paper"), (0.5, 0.0, "kernels")],
)
def test_train_step_metrics_match_numpy(batch, initial_state, lam, smoothing, selection):
    config = load_config("mnist5k_kure", "tiny")
    config.kure.lambda_, config.label_smoothing, config.kure.selection = lam, smoothing, selection
    model = build_model(config, axis_name=None)
    state = make_state(config, initial_state)
    spec = step_config(config, model, SHAPE, axis_name=None)
    step = jax.jit(make_train_step(model, spec))
    _, metrics = step(state, batch)

    logits, _ = model.apply(state.variables, batch["image"], train=True, mutable=["batch_stats"])
    ce = np_cross_entropy(logits, batch["label"], 10, smoothing)
    kurts = np.array([np_kurtosis(state.params[name]["kernel"]) for name in SELECTED[selection]])
    kure = np.mean((kurts - 1.8) ** 2)
    np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["kure"], kure if lam else 0.0, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss"], ce + lam * kure, rtol=1e-5)
    np.testing.assert_allclose(metrics["kurtosis_mean"], kurts.mean(), rtol=1e-4)
    np.testing.assert_allclose(metrics["kurtosis_max"], kurts.max(), rtol=1e-4)
    accuracy = np.mean(np.argmax(np.asarray(logits), -1) == batch["label"])
    np.testing.assert_allclose(metrics["accuracy"], accuracy)
    assert bool(metrics["finite"])

    bad = dict(batch, image=batch["image"].copy())
    bad["image"][0, 0, 0, 0] = np.nan
    assert not bool(step(state, bad)[1]["finite"])


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_train_step_is_sgd_on_ce_plus_kure_with_optax_weight_decay(batch, initial_state, lam):
    config = load_config("mnist5k_kure", "tiny")
    config.kure.lambda_, config.kure.selection = lam, "kernels"
    config.optimizer.momentum, config.schedule.name = 0.0, "constant"
    config.learning_rate, config.weight_decay = 0.1, 1e-2
    model = build_model(config, axis_name=None)
    state = make_state(config, initial_state)
    spec = step_config(config, model, SHAPE, axis_name=None)
    new_state, _ = jax.jit(make_train_step(model, spec))(state, batch)

    def reference_loss(params):  # written here: log-softmax CE + lam * mean (kurt - 1.8)^2
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, _ = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
        log_probs = jax.nn.log_softmax(logits)
        ce = -jnp.mean(jnp.take_along_axis(log_probs, batch["label"][:, None], axis=1))
        kernels = [params[name]["kernel"] for name in SELECTED["kernels"]]
        kurts = jnp.stack([jnp.mean((w - w.mean()) ** 4) / jnp.var(w) ** 2 for w in kernels])
        return ce + lam * jnp.mean((kurts - 1.8) ** 2)

    grads = jax.jit(jax.grad(reference_loss))(state.params)
    expected = jax.tree.map(lambda p, g: p - 0.1 * (g + 1e-2 * p), state.params, grads)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        new_state.params,
        expected,
    )
    _, updates = model.apply(state.variables, batch["image"], train=True, mutable=["batch_stats"])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        new_state.batch_stats,
        updates["batch_stats"],
    )
    assert int(new_state.step) == 1


def test_pretrained_variables_must_match_the_model(initial_state):
    config = load_config("mnist5k_kure", "tiny")
    model = build_model(config, axis_name=None)
    tx = optax.sgd(0.1)
    state = create_train_state(
        model, rng=jax.random.key(5), input_shape=SHAPE, tx=tx,
        pretrained={**initial_state.variables, "quant": {"ignored": 1.0}},
    )
    jax.tree.map(np.testing.assert_array_equal, state.params, initial_state.params)
    config.model_options.hidden = 16
    with pytest.raises(ValueError, match="'params' do not match the model"):
        create_train_state(
            build_model(config, axis_name=None), rng=jax.random.key(5), input_shape=SHAPE,
            tx=tx, pretrained=initial_state.variables,
        )


def test_bfloat16_compute_keeps_float32_state(batch, initial_state):
    config = load_config("mnist5k_kure", "tiny")
    config.dtype = "bfloat16"
    model = build_model(config, axis_name=None)
    spec = step_config(config, model, SHAPE, axis_name=None)
    new_state, metrics = jax.jit(make_train_step(model, spec))(initial_state, batch)
    assert bool(metrics["finite"]) and metrics["loss"].dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(new_state.params)} == {jnp.dtype("float32")}
    # bfloat16 convs differ from float32 by rounding only: the loss agrees to ~1%.
    f32_model = build_model(load_config("mnist5k_kure", "tiny"), axis_name=None)
    _, f32 = jax.jit(make_train_step(f32_model, spec))(initial_state, batch)
    np.testing.assert_allclose(metrics["ce"], f32["ce"], rtol=2e-2)


@pytest.mark.parametrize(
    ("name", "expected_param_update"),
    [("sgd", -0.1 * 0.01), ("adam", -0.1), ("adamw", -0.1 * 0.01)],
)
def test_weight_decay_is_optax_and_skips_quantizer_steps(name, expected_param_update):
    config = load_config("mnist5k_kure")
    config.optimizer.name, config.optimizer.momentum = name, 0.0
    config.learning_rate, config.weight_decay = 0.1, 0.01
    tx = make_optimizer(config, optax.constant_schedule(0.1))
    tree = {"params": {"w": jnp.ones(3)}, "quant": {"step": jnp.ones(())}}
    zeros = jax.tree.map(jnp.zeros_like, tree)
    updates, _ = tx.update(zeros, tx.init(tree), tree)
    # sgd: -lr * wd * w; adam: the L2 gradient wd * w normalised to 1; adamw: -lr * wd * w.
    np.testing.assert_allclose(updates["params"]["w"], expected_param_update, rtol=1e-4)
    assert float(updates["quant"]["step"]) == 0.0


@pytest.mark.parametrize(
    ("schedule", "steps", "expected"),
    [
        ({"name": "constant"}, [0, 50, 99], [0.1, 0.1, 0.1]),
        ({"name": "cosine"}, [0, 50, 100], [0.1, 0.05, 0.0]),
        ({"name": "step", "milestones": (2, 4)}, [19, 20, 39, 40], [0.1, 0.01, 0.01, 0.001]),
        ({"name": "cosine", "warmup_epochs": 1.0}, [0, 5, 10, 55], [0.0, 0.05, 0.1, 0.05]),
    ],
)
def test_schedules(schedule, steps, expected):
    config = load_config("mnist5k_kure")
    config.learning_rate, config.schedule.gamma = 0.1, 0.1
    config.schedule.update(schedule)
    fn = make_schedule(config, steps_per_epoch=10, num_steps=100)
    np.testing.assert_allclose([float(fn(s)) for s in steps], expected, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("model", "resnet", "small_cnn"),
        ("optimizer.name", "rmsprop", "adamw"),
        ("schedule.name", "linear", "cosine"),
        ("dtype", "float16", "bfloat16"),
        ("parallel", "shard_map", "pmap"),
        ("kure.selection", "all", "paper"),
        ("kure.reduction", "median", "mean"),
        ("batch_size", 0, "batch_size"),
        ("learning_rate", -1.0, "learning_rate"),
        ("kure.lambda_", -0.5, "lambda_"),
        ("label_smoothing", 1.0, "label_smoothing"),
        ("keep_checkpoints", 0, "resuming"),
    ],
)
def test_validate_config_names_the_field_and_choices(field, value, match):
    config = load_config("mnist5k_kure")
    validate_config(config)
    *parents, last = field.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    with config.unlocked():
        node[last] = value
    with pytest.raises(ValueError, match=match):
        validate_config(config)


def test_step_schedule_needs_increasing_milestones():
    config = load_config("mnist5k_kure")
    config.schedule.name, config.schedule.milestones = "step", (5, 3)
    with pytest.raises(ValueError, match="increasing"):
        validate_config(config)


@pytest.mark.parametrize(
    "name", ["mnist5k_kure", "mnist5k_baseline", "mnist5k_qat_w4a4", "cifar10_resnet20",
             "imagenet_resnet18_kure", "imagenet_resnet50_kure", "imagenet_mobilenet_v2_kure",
             "imagenet_resnet18_dorefa_w4a4", "imagenet_resnet18_lsq_w4a4",
             "mnist5k_anyprecision", "mnist5k_matryoshka", "mnist5k_matryoshka_kure"]
)
def test_shipped_configs_are_valid(name):
    config = load_config(name)
    validate_config(config)
    assert config.is_locked is False  # config_flags locks it; get_config must not
    assert set(config.keys()) == set(load_config("mnist5k_kure").keys())


# ---------------------------------------------------------------- data interface


def test_unknown_dataset_lists_the_available_ones():
    assert "mnist5k" in DATASET_NAMES
    assert {"mnist", "cifar10", "imagenet2012", "folder"} <= set(DATASET_NAMES)
    with pytest.raises(ValueError, match=r"Unknown dataset 'mnist6k'.*mnist5k.*imagenet2012"):
        get_dataset("mnist6k")
    with pytest.raises(ValueError, match="max_shift"):
        get_dataset("mnist5k", shift=2)


def test_train_batches_are_a_pure_function_of_seed_and_step(dataset):
    assert isinstance(dataset, Dataset)
    from_start = dataset.train_batches(seed=1, start_step=0, global_batch_size=32)
    batches = [next(from_start) for _ in range(130)]  # crosses an epoch (125 steps)
    resumed = next(dataset.train_batches(seed=1, start_step=127, global_batch_size=32))
    np.testing.assert_array_equal(resumed["image"], batches[127]["image"])
    other_seed = next(dataset.train_batches(seed=2, start_step=0, global_batch_size=32))
    assert not np.array_equal(other_seed["label"], batches[0]["label"])
    # One epoch visits every training image exactly once.
    epoch = np.concatenate([b["image"] for b in batches[:125]]).reshape(4000, -1)
    train = dataset.train_images.reshape(4000, -1)
    assert len({row.tobytes() for row in epoch}) == len({row.tobytes() for row in train})
    np.testing.assert_array_equal(np.sort(epoch.sum(1)), np.sort(train.sum(1)))
    with pytest.raises(ValueError, match="exceeds"):
        dataset.train_batches(seed=0, start_step=0, global_batch_size=5000)


@pytest.mark.parametrize("max_shift", [1, 3])
def test_random_shifts_translate_with_zero_fill(max_shift):
    images = np.random.default_rng(0).uniform(size=(6, 8, 8, 1)).astype(np.float32)
    labels = np.arange(6, dtype=np.int32)
    data = InMemoryDataset(
        name="toy", train_images=images, train_labels=labels, eval_images=images,
        eval_labels=labels, num_classes=6, max_shift=max_shift,
    )
    plain = dataclasses.replace(data, max_shift=0)
    shifted = next(data.train_batches(seed=4, start_step=2, global_batch_size=6))
    unshifted = next(plain.train_batches(seed=4, start_step=2, global_batch_size=6))
    np.testing.assert_array_equal(shifted["label"], unshifted["label"])
    seen = set()
    for got, original in zip(shifted["image"], unshifted["image"], strict=True):
        # Reference: the (dy, dx) among all allowed ones for which np.roll + zeroing matches.
        matches = []
        for dy in range(-max_shift, max_shift + 1):
            for dx in range(-max_shift, max_shift + 1):
                expected = np.roll(original, (dy, dx), axis=(0, 1))
                expected[: max(dy, 0)] = expected[8 + min(dy, 0) :] = 0
                expected[:, : max(dx, 0)] = expected[:, 8 + min(dx, 0) :] = 0
                if np.array_equal(got, expected):
                    matches.append((dy, dx))
        assert matches, "every image is a zero-filled translation within max_shift"
        seen.update(matches)
    assert len(seen) > 1  # the offsets vary
    with pytest.raises(ValueError, match="max_shift"):
        dataclasses.replace(data, max_shift=8)


def test_eval_batches_cover_the_split_once_with_padding(dataset):
    batches = list(dataset.eval_batches(global_batch_size=300))
    assert [len(b["label"]) for b in batches] == [300] * 4
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 1000 and not mask[1000:].any()
    labels = np.concatenate([b["label"] for b in batches])[:1000]
    np.testing.assert_array_equal(labels, dataset.eval_labels)


# ---------------------------------------------------------------- QAT and the command line


def test_qat_train_step_updates_params_and_quantizer_steps(batch):
    pytest.importorskip("kure_jax.qat")
    from kure_jax.training import qat_config

    config = load_config("mnist5k_qat_w4a4")
    config.model_options.features, config.model_options.hidden = (8, 16), 32
    model = build_model(config, axis_name=None)
    qat = qat_config(config)
    tx = make_optimizer(config, make_schedule(config, steps_per_epoch=125, num_steps=10))
    state = create_train_state(
        model, rng=jax.random.key(0), input_shape=SHAPE, tx=tx, qat=qat,
        sample_images=batch["image"],
    )
    assert state.quant, "lsq keeps learned steps in the quant collection"
    spec = step_config(config, model, SHAPE, axis_name=None)
    new_state, metrics = jax.jit(make_train_step(model, spec))(state, batch)
    assert bool(metrics["finite"])
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), new_state.quant, state.quant)
    assert all(jax.tree.leaves(changed)), "every learned step gets a gradient"
    sums = jax.jit(make_state_eval_step(model, spec))(
        new_state, dict(batch, mask=np.ones(32, np.float32))
    )
    assert sums["count"] == 32


def run_cli(*args, cwd, cache=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
    )


@pytest.mark.slow
def test_cli_rejects_misspelt_fields(tmp_path):
    result = run_cli("--config.num_epoch=2", cwd=tmp_path)
    assert result.returncode != 0
    assert "num_epoch" in result.stderr


@pytest.mark.slow
def test_cli_trains_and_writes_metrics(tmp_path, persistent_compilation_cache):
    config = f"{ROOT / 'configs' / 'mnist5k_kure.py'}:tiny"
    # The tiny config, its programs kept in the worker's compilation cache (the in-process
    # checkpoint tests compile without XLA optimisations: theirs are other programs).
    result = run_cli(
        f"--config={config}", "--config.log_every_steps=3", cwd=tmp_path,
        cache=persistent_compilation_cache,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "final test accuracy" in result.stdout
    workdir = tmp_path / "runs" / "mnist5k_kure"  # default: runs/<config file name>
    assert (workdir / "metrics.jsonl").is_file()
    assert (workdir / "checkpoints" / "6").is_dir()


@pytest.mark.slow
def test_default_config_learns_mnist5k(tmp_path):
    # The real default (model, data, optimizer, KURE) for 2 of its 10 epochs; the full run
    # reaches about 98% (see the report in configs/mnist5k_kure.py).
    config = load_config("mnist5k_kure")
    config.num_epochs = 2.0
    result = train_and_evaluate(config, tmp_path)
    assert result.eval_metrics["accuracy"] > 0.9
    kurtosis = list(result.eval_metrics["kurtosis"].values())
    assert max(kurtosis) < 2.5  # KURE has pulled every regularised kernel towards 1.8

