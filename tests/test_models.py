"""Tests for kure_jax.models: structure via jax.eval_shape, real passes on small nets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kure_jax import models
from kure_jax.models._base import HEAD_NAME, STEM_NAME
from kure_jax.selection import PAPER_LAYERS, layer_order, select

IMAGENET = ("resnet18", "resnet50", "mobilenet_v2")
SMALL = ("resnet20", "small_cnn")


# Compile time dominates these tests; runtime speed does not matter.
pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def small_cnn_variables():
    # A real (jitted) init; shared because each init compiles for seconds.
    model = models.get_model("small_cnn", num_classes=10)
    return jax.jit(model.init)(jax.random.key(0), _images("small_cnn", 1))


def _random_variables(model, name, seed=0):
    """He-scaled random params from the abstract shapes: no init compile for big nets."""
    abstract, _ = _abstract_variables(model, name)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        last = path[-1].key
        if last == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)
        else:
            value = np.ones(leaf.shape) if last in ("scale", "var") else np.zeros(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _classes(name):
    return 1000 if name in IMAGENET else 10


def _abstract_variables(model, name, batch=1):
    x = jax.ShapeDtypeStruct((batch, *models.MODEL_INPUT_SHAPES[name]), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x), x


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _named_leaves(tree):
    return [
        (tuple(str(k.key) for k in path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _images(name, batch, seed=0):
    shape = (batch, *models.MODEL_INPUT_SHAPES[name])
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# Expected counts: torchvision's resnet18/resnet50/mobilenet_v2 at 1000 classes.
@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet18", 11_689_512), ("resnet50", 25_557_032), ("mobilenet_v2", 3_504_872)],
)
def test_imagenet_param_counts_match_torchvision(name, expected):
    variables, _ = _abstract_variables(models.get_model(name, num_classes=1000), name)
    assert _count(variables["params"]) == expected
    assert set(variables) == {"params", "batch_stats"}


def _conv(k, cin, cout):
    return k * k * cin * cout


def _bn(c):
    return 2 * c


def test_small_model_param_counts_match_hand_count():
    # ResNet-20 with 1x1 projection shortcuts in the two downsampling blocks.
    resnet20 = _conv(3, 3, 16) + _bn(16)
    cin = 16
    for width in (16, 32, 64):
        for b in range(3):
            resnet20 += _conv(3, cin, width) + _conv(3, width, width) + 2 * _bn(width)
            if b == 0 and cin != width:
                resnet20 += _conv(1, cin, width) + _bn(width)
            cin = width
    resnet20 += 64 * 10 + 10
    assert resnet20 == 269_722 + 2_752  # He et al.'s option-A count plus the projections.
    # SmallCNN: three conv stages 28 -> 14 -> 7 -> 3, then 1152 -> 128 -> 10.
    small = sum(_conv(3, a, b) + _bn(b) for a, b in [(1, 32), (32, 64), (64, 128)])
    small += 3 * 3 * 128 * 128 + 128 + 128 * 10 + 10
    for name, expected in [("resnet20", resnet20), ("small_cnn", small)]:
        variables, _ = _abstract_variables(models.get_model(name, num_classes=10), name)
        assert _count(variables["params"]) == expected, name


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_stem_and_head_names_and_kernel_leaves(name):
    num_classes = _classes(name)
    variables, _ = _abstract_variables(models.get_model(name, num_classes=num_classes), name)
    params = variables["params"]
    stem = params[STEM_NAME]["kernel"]
    head = params[HEAD_NAME]["kernel"]
    assert stem.ndim == 4 and stem.shape[2] == models.MODEL_INPUT_SHAPES[name][-1]
    assert head.ndim == 2 and head.shape[1] == num_classes
    assert params[HEAD_NAME]["bias"].shape == (num_classes,)
    leaves = _named_leaves(params)
    weights = [path for path, leaf in leaves if leaf.ndim >= 2]
    assert weights and all(path[-1] == "kernel" for path in weights)
    assert all(leaf.ndim == 1 for path, leaf in leaves if path[-1] != "kernel")
    # No conv has a bias: BatchNorm follows each one.
    assert all(path[-1] != "bias" or "norm" in path[-2] or path[-2] in ("head", "hidden")
               for path, _ in leaves)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_stem_called_first_and_head_last(name):
    # eval_shape returns key-sorted dicts: the call order comes from the jaxpr (layer_order).
    model = models.get_model(name, num_classes=_classes(name))
    variables, x = _abstract_variables(model, name)
    forward = lambda v: model.apply(v, jnp.zeros(x.shape), mutable=True)
    order = layer_order(forward, variables)
    assert order[0] == STEM_NAME
    assert order[-1] == HEAD_NAME
    kernels = {p for p, _ in select(variables)}
    chosen = {p for p, _ in select(variables, PAPER_LAYERS.where(variables, forward=forward))}
    assert kernels - chosen == {"params/stem_conv/kernel", "params/head/kernel"}


@pytest.mark.parametrize(
    ("name", "module", "shape"),
    [
        ("resnet18", "stem_conv", (1, 112, 112, 64)),
        ("resnet18", "stage1_block1", (1, 56, 56, 64)),
        ("resnet18", "stage4_block2", (1, 7, 7, 512)),
        ("resnet50", "stage2_block1/conv1", (1, 56, 56, 128)),  # v1.5: stride in the 3x3
        ("resnet50", "stage2_block1/conv2", (1, 28, 28, 128)),
        ("resnet50", "stage4_block3", (1, 7, 7, 2048)),
        ("mobilenet_v2", "block1", (1, 112, 112, 16)),
        ("mobilenet_v2", "block17", (1, 7, 7, 320)),
        ("mobilenet_v2", "last_conv", (1, 7, 7, 1280)),
        ("resnet20", "stem_conv", (1, 32, 32, 16)),
        ("resnet20", "stage3_block3", (1, 8, 8, 64)),
        ("small_cnn", "conv2", (1, 7, 7, 128)),
    ],
)
def test_feature_map_shapes(name, module, shape):
    model = models.get_model(name, num_classes=_classes(name))
    variables, x = _abstract_variables(model, name)
    apply = functools.partial(model.apply, capture_intermediates=True, mutable=["intermediates"])
    logits, state = jax.eval_shape(apply, variables, x)
    node = state["intermediates"]
    for key in module.split("/"):
        node = node[key]
    assert node["__call__"][0].shape == shape
    assert logits.shape == (1, _classes(name)) and logits.dtype == jnp.float32


def _train_loss(model, params, batch_stats, x, labels):
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, updates["batch_stats"])


@pytest.mark.parametrize("name", SMALL)
def test_forward_backward_and_batch_stats(name, small_cnn_variables):
    model = models.get_model(name, num_classes=10)
    x = _images(name, 4)
    labels = jnp.array([0, 1, 2, 3])
    if name == "small_cnn":
        variables = small_cnn_variables
    else:
        variables = _random_variables(model, name)
    params, batch_stats = variables["params"], variables["batch_stats"]
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(_train_loss, model), has_aux=True))
    (loss, (logits, new_stats)), grads = grad_fn(params, batch_stats, x, labels)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    assert np.isfinite(loss) and np.all(np.isfinite(logits))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.any(grads[STEM_NAME]["kernel"] != 0)
    assert np.any(grads[HEAD_NAME]["kernel"] != 0)
    old = jax.tree.leaves(batch_stats)
    assert all(np.all(a != b) for a, b in zip(old, jax.tree.leaves(new_stats), strict=True))

    eval_fn = jax.jit(functools.partial(model.apply, train=False, mutable=["batch_stats"]))
    eval_logits, eval_state = eval_fn(variables, x)
    assert eval_logits.shape == (4, 10) and eval_logits.dtype == jnp.float32
    assert np.all(np.isfinite(eval_logits))
    new = jax.tree.leaves(eval_state["batch_stats"])
    assert all(np.array_equal(a, b) for a, b in zip(old, new, strict=True))


@pytest.mark.parametrize("train", [True, False])
def test_eval_mode_is_per_example(train, small_cnn_variables):
    # Running averages make an example's logits independent of its batch; batch
    # statistics do not.
    model = models.get_model("small_cnn", num_classes=10)
    x = _images("small_cnn", 4)
    variables = small_cnn_variables
    apply = jax.jit(functools.partial(model.apply, train=train, mutable=["batch_stats"]))
    full, _ = apply(variables, x)
    part, _ = apply(variables, x[:2])
    assert np.allclose(full[:2], part, atol=1e-5) == (not train)


def test_running_stats_follow_numpy_reference(small_cnn_variables):
    # new = 0.9 * old + 0.1 * batch statistic, on the stem conv's output
    # (3x3 cross-correlation, padding 1); Flax uses the biased batch variance.
    model = models.get_model("small_cnn", num_classes=10)
    x = _images("small_cnn", 3, seed=1)
    variables = small_cnn_variables
    _, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    kernel = np.asarray(variables["params"]["stem_conv"]["kernel"], np.float64)
    padded = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = sum(
        padded[:, dy : dy + 28, dx : dx + 28, :] @ kernel[dy, dx]
        for dy in range(3)
        for dx in range(3)
    )
    stats = updates["batch_stats"]["stem_norm"]
    np.testing.assert_allclose(stats["mean"], 0.1 * out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        stats["var"], 0.9 + 0.1 * out.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )


def test_small_cnn_hidden_norm_follows_numpy_reference():
    # hidden_norm=True: head(relu(BN(x @ W))) with batch statistics in train mode (biased
    # variance, eps 1e-5, initial scale 1 and offset 0); `hidden` loses its bias.
    model = models.get_model("small_cnn", num_classes=10, features=(4, 8), hidden=16,
                             hidden_norm=True)
    x = _images("small_cnn", 6, seed=2)
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    assert set(variables["params"]["hidden"]) == {"kernel"}
    assert {k: v.shape for k, v in variables["params"]["hidden_norm"].items()} == {
        "scale": (16,), "bias": (16,)}
    assert set(variables["batch_stats"]["hidden_norm"]) == {"mean", "var"}
    plain = jax.eval_shape(models.get_model("small_cnn", num_classes=10).init,
                           jax.random.key(0), x[:1])
    assert "hidden_norm" not in plain["params"] and "bias" in plain["params"]["hidden"]

    apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats",
                                                                       "intermediates"],
                                      capture_intermediates=True))
    logits, state = apply(variables, x)
    h = np.asarray(state["intermediates"]["hidden"]["__call__"][0], np.float64)
    normed = (h - h.mean(axis=0)) / np.sqrt(h.var(axis=0) + 1e-5)
    head = variables["params"][HEAD_NAME]
    expected = np.maximum(normed, 0) @ np.asarray(head["kernel"], np.float64) + np.asarray(
        head["bias"], np.float64)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(state["batch_stats"]["hidden_norm"]["mean"], 0.1 * h.mean(axis=0),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_bf16_compute_keeps_float32_params_and_logits(name):
    model = models.get_model(name, num_classes=_classes(name), dtype=jnp.bfloat16)
    variables, x = _abstract_variables(model, name)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    logits = jax.eval_shape(model.apply, variables, x)
    assert logits.dtype == jnp.float32


def test_bf16_small_cnn_computes_in_bf16_and_matches_float32(small_cnn_variables):
    x = _images("small_cnn", 2)
    f32 = models.get_model("small_cnn", num_classes=10)
    bf16 = models.get_model("small_cnn", num_classes=10, dtype="bfloat16")
    variables = small_cnn_variables
    jaxpr = str(jax.make_jaxpr(bf16.apply)(variables, x))
    conv_lines = [line for line in jaxpr.splitlines() if "= conv_general_dilated" in line]
    assert len(conv_lines) == 3 and all("bf16[" in line for line in conv_lines)
    want = jax.jit(f32.apply)(variables, x)
    got = jax.jit(bf16.apply)(variables, x)
    assert got.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, atol=0.05 * scale)


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_residual(zero_init):
    model = models.get_model("resnet20", num_classes=10, zero_init_residual=zero_init)
    x = _images("resnet20", 1)
    # Only the norm parameters leave the jitted init, so XLA prunes the kernels' RNG.
    def norm_scales(key):
        params = model.init(key, x)["params"]
        return {
            block: {layer: p["scale"] for layer, p in params[block].items() if "norm" in layer}
            for block in params
            if block.startswith("stage")
        }

    scales = jax.jit(norm_scales)(jax.random.key(0))
    assert len(scales) == 9
    for block in scales.values():
        np.testing.assert_array_equal(block["norm2"], 0.0 if zero_init else 1.0)
        np.testing.assert_array_equal(block["norm1"], 1.0)
    assert "proj_norm" in scales["stage2_block1"] and "proj_norm" not in scales["stage1_block1"]
    np.testing.assert_array_equal(scales["stage2_block1"]["proj_norm"], 1.0)


def test_resnet50_zero_init_targets_norm3():
    model = models.get_model("resnet50", num_classes=10, zero_init_residual=True)
    variables, _ = _abstract_variables(model, "resnet50")
    assert set(variables["params"]["stage1_block1"]) >= {"norm3", "proj_conv", "proj_norm"}


def test_mobilenet_dropout_needs_rng_in_train_mode():
    model = models.get_model("mobilenet_v2", num_classes=10)
    variables, x = _abstract_variables(model, "mobilenet_v2")
    apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="dropout"):
        jax.eval_shape(apply, variables, x)
    logits, _ = jax.eval_shape(
        functools.partial(apply, rngs={"dropout": jax.random.key(0)}), variables, x
    )
    assert logits.shape == (1, 10)
    no_dropout = models.get_model("mobilenet_v2", num_classes=10, dropout_rate=0.0)
    logits, _ = jax.eval_shape(
        functools.partial(no_dropout.apply, train=True, mutable=["batch_stats"]), variables, x
    )
    assert logits.shape == (1, 10)


def test_get_model_errors():
    with pytest.raises(ValueError, match=r"allowed names.*resnet18.*small_cnn"):
        models.get_model("resnet34", num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        models.get_model("resnet20", num_classes=0)
    with pytest.raises(ValueError, match=r"Unknown option.*'stages'.*allowed"):
        models.get_model("resnet20", num_classes=10, stages=(1,))
    with pytest.raises(ValueError, match="floating dtype"):
        models.get_model("small_cnn", num_classes=10, dtype=jnp.int8)
    with pytest.raises(ValueError, match="floating dtype"):
        models.get_model("small_cnn", num_classes=10, dtype="not-a-dtype")
    with pytest.raises(ValueError, match="stem must be one of"):
        models.get_model("resnet18", num_classes=10, stem="tiny")
    with pytest.raises(ValueError, match="dropout_rate"):
        models.get_model("mobilenet_v2", num_classes=10, dropout_rate=1.0)
    model = models.get_model("small_cnn", num_classes=10)
    with pytest.raises(ValueError, match="rank 4"):
        model.init(jax.random.key(0), jnp.zeros((28, 28, 1)))


def test_registry_tables_agree():
    assert set(models.MODEL_INPUT_SHAPES) == set(models.MODEL_NAMES)
    assert set(models.MODEL_NAMES) == {*IMAGENET, *SMALL}
    assert models.MODEL_INPUT_SHAPES["small_cnn"] == (28, 28, 1)
    assert models.MODEL_INPUT_SHAPES["resnet20"] == (32, 32, 3)
    assert models.MODEL_INPUT_SHAPES["resnet50"] == (224, 224, 3)
