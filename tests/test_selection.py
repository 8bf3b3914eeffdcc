"""Leaf selection: default rule, predicates, LayerRule and the call order on real Flax params."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kure_jax
from kure_jax.selection import (
    as_rule,
    edge_layers,
    layer_order,
    path_to_str,
    select,
    selection_mask,
)


class TwelveConvNet(nn.Module):
    """Twelve convs: alphabetical key order ("Conv_10" < "Conv_2") differs from call order."""

    @nn.compact
    def __call__(self, x):
        for _ in range(12):
            x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.Dense(8)(x.mean(axis=(1, 2)))
        return nn.Dense(3)(x)


@pytest.fixture(scope="module")
def flax_variables():
    return jax.eval_shape(TwelveConvNet().init, jax.random.key(0), jnp.zeros((1, 8, 8, 2)))


def test_default_selection_picks_kernels_only(flax_variables):
    names = [name for name, _ in select(flax_variables)]
    assert len(names) == 14
    assert all(name.endswith("/kernel") for name in names)


def test_default_selection_falls_back_to_rank_two_without_kernel_names():
    tree = {"w1": np.ones((3, 4)), "b1": np.ones(4), "w2": [np.ones((2, 2, 2))]}
    assert [name for name, _ in select(tree)] == ["w1", "w2/0"]


def test_selection_mask_structure_and_values():
    tree = {"dense": {"kernel": np.ones((3, 4)), "bias": np.ones(4)}}
    mask = selection_mask(tree)
    assert mask == {"dense": {"kernel": True, "bias": False}}


def _twelve_forward(variables):
    return TwelveConvNet().apply(variables, jnp.zeros((1, 8, 8, 2)))


def test_paper_layers_exclude_first_conv_and_last_dense(flax_variables):
    # eval_shape's dicts are key-sorted ("Conv_10" < "Conv_2"): the order comes from forward.
    assert layer_order(_twelve_forward, flax_variables) == [
        *(f"Conv_{i}" for i in range(12)), "Dense_0", "Dense_1"]
    where = kure_jax.PAPER_LAYERS.where(flax_variables, forward=_twelve_forward)
    names = {name for name, _ in select(flax_variables, where)}
    assert "params/Conv_0/kernel" not in names
    assert "params/Dense_1/kernel" not in names
    assert {"params/Conv_1/kernel", "params/Conv_10/kernel", "params/Conv_11/kernel"} <= names
    assert "params/Dense_0/kernel" in names
    assert len(names) == 12
    inner = {name for name, _ in select(flax_variables["params"], where)}
    assert len(inner) == 12 and "Conv_0/kernel" not in inner  # with or without "params"


class NamedOutOfOrderNet(nn.Module):
    """Layer names whose alphabetical order is the reverse of the call order."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="z_first")(x)
        x = nn.Conv(4, (3, 3), name="a_second")(x)
        x = nn.Dense(4, name="b_hidden")(x.mean(axis=(1, 2)))
        return nn.Dense(2, name="a_out")(x)


def test_layer_order_is_the_call_order_whatever_the_dict_order():
    x = jnp.zeros((1, 6, 6, 1))
    eager = NamedOutOfOrderNet().init(jax.random.key(0), x)  # insertion = call order
    jitted = jax.jit(NamedOutOfOrderNet().init)(jax.random.key(0), x)  # key-sorted
    forward = lambda v: NamedOutOfOrderNet().apply(v, x)
    for variables in (eager, jitted):
        assert layer_order(forward, variables) == ["z_first", "a_second", "b_hidden", "a_out"]
        where = kure_jax.PAPER_LAYERS.where(variables, forward=forward)
        assert {n for n, _ in select(variables, where)} == {
            "params/a_second/kernel", "params/b_hidden/kernel"}
    # Without forward only an eager init's insertion order is the call order.
    assert {n for n, _ in select(eager, kure_jax.PAPER_LAYERS)} == {
        "params/a_second/kernel", "params/b_hidden/kernel"}


def test_layer_order_of_an_nnx_model():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.z_stem = nnx.Conv(1, 4, (3, 3), rngs=rngs)
            self.a_head = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.a_head(self.z_stem(x).mean(axis=(1, 2)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    forward = lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 6, 6, 1)))
    assert layer_order(forward, state) == ["z_stem", "a_head"]  # the state is name-sorted


def test_paper_layers_leave_nothing_of_a_one_conv_model():
    with pytest.raises(ValueError, match="selects no layer of \\['Conv_0'\\]"):
        select({"Conv_0": {"kernel": np.ones((3, 3, 1, 2))}}, kure_jax.PAPER_LAYERS)


def test_predicate_receives_string_paths():
    seen = []
    tree = {"a": [np.ones((2, 2)), {"kernel": np.ones((2, 2))}]}
    select(tree, lambda path, leaf: seen.append(path) or True)
    assert seen == [("a", "0"), ("a", "1", "kernel")]
    assert path_to_str(("a", "1", "kernel")) == "a/1/kernel"


def test_layer_rule_excludes_layers_by_name(flax_variables):
    params = {
        "block": {"kernel": np.ones((3, 3, 4, 4))},
        "head": {"kernel": np.ones((4, 2))},
        "proj": {"kernel": np.ones((4, 4))},
        "stem_conv": {"kernel": np.ones((3, 3, 1, 4))},
    }
    rule = kure_jax.LayerRule(exclude="stem_conv|head")
    assert {name for name, _ in select(params, rule)} == {"block/kernel", "proj/kernel"}
    names = {n for n, _ in select(flax_variables, kure_jax.LayerRule(exclude="Conv_3|Dense_0"))}
    assert "params/Conv_3/kernel" not in names and "params/Dense_0/kernel" not in names
    assert "params/Conv_0/kernel" in names and "params/Dense_1/kernel" in names


def test_an_unused_rule_is_reported_by_name():
    # As qwix's get_unused_rules: a typo in exclude would otherwise exclude nothing, silently.
    rule = kure_jax.LayerRule(exclude="hed")
    assert rule.unused(list(RULE_PARAMS)) == ["exclude='hed'"]
    with pytest.warns(UserWarning, match=r"exclude='hed' matches no layer of \['stem', "):
        names = rule.layers(RULE_PARAMS)
    assert names == ["stem", "block1/conv1", "block1/conv2", "fc", "head"]
    with pytest.raises(ValueError, match=r"selects no layer.*; include='nope' matches no layer"):
        kure_jax.LayerRule(include="nope").layers(RULE_PARAMS)
    assert kure_jax.LayerRule(exclude="head").unused(list(RULE_PARAMS)) == []


# ---------------------------------------------------------------------------------------------
# LayerRule: the one rule type of the penalty, PTQ, QAT's layers and the sweep.

RULE_PARAMS = {
    "stem": {"kernel": np.ones((3, 3, 1, 4))},
    "block1": {"conv1": {"kernel": np.ones((3, 3, 4, 4))},
               "conv2": {"kernel": np.ones((3, 3, 4, 4))}},
    "fc": {"kernel": np.ones((4, 8)), "bias": np.ones(8)},
    "head": {"kernel": np.ones((8, 10)), "bias": np.ones(10)},
}


@pytest.mark.parametrize("rule, expected", [
    (kure_jax.LayerRule(), ["stem", "block1/conv1", "block1/conv2", "fc", "head"]),
    (kure_jax.PAPER_LAYERS, ["block1/conv1", "block1/conv2", "fc"]),
    (kure_jax.LayerRule(include="block1/.*"), ["block1/conv1", "block1/conv2"]),
    (kure_jax.LayerRule(exclude=".*conv2|head"), ["stem", "block1/conv1", "fc"]),
    (kure_jax.LayerRule(skip_last_dense=True), ["stem", "block1/conv1", "block1/conv2", "fc"]),
])
def test_layer_rule_selects_layers(rule, expected):
    assert rule.layers(RULE_PARAMS) == expected
    assert rule.layers({"params": RULE_PARAMS}) == expected
    names = [name for name, _ in select(RULE_PARAMS, rule)]
    assert names == sorted(f"{layer}/kernel" for layer in expected)


def test_layer_rule_follows_a_given_call_order():
    # Key-sorted trees (jit init, restored checkpoints) lose the order: pass the call order.
    order = ["stem", "block1/conv1", "block1/conv2", "fc", "head"]
    shuffled = {k: RULE_PARAMS[k] for k in ("head", "fc", "block1", "stem")}
    # In insertion order 'head' comes first and 'fc' is the last dense: the wrong two go.
    assert kure_jax.PAPER_LAYERS.layers(shuffled) == ["block1/conv1", "block1/conv2", "stem"]
    assert kure_jax.PAPER_LAYERS.layers(shuffled, order=order) == [
        "block1/conv1", "block1/conv2", "fc"]


def test_layer_rule_is_static_under_inject_hyperparams():
    import jax
    import optax

    params = jax.tree.map(jnp.asarray, RULE_PARAMS)
    tx = optax.inject_hyperparams(kure_jax.add_penalty)(coeff=1.0, where=kure_jax.PAPER_LAYERS)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["stem"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(updates["head"]["kernel"]).max()) == 0.0


def test_layer_rule_errors():
    with pytest.raises(ValueError, match="regex"):
        kure_jax.LayerRule(include="(")
    with pytest.raises(ValueError, match="True or False"):
        kure_jax.LayerRule(skip_first=1)
    with pytest.raises(ValueError, match="selects no layer"):
        kure_jax.LayerRule(include="nope").layers(RULE_PARAMS)
    with pytest.raises(ValueError, match=r"matched no leaf|selects no layer"):
        kure_jax.penalty(RULE_PARAMS, where=kure_jax.LayerRule(include="nope"))


def test_edge_layers():
    layers = [("a", False), ("b", True), ("c", False), ("d", True)]
    assert edge_layers(layers, first=True, last_dense=True) == {"a", "d"}
    assert edge_layers(layers, first=False, last_dense=True) == {"d"}
    assert edge_layers([("a", False)], first=False, last_dense=True) == set()
    assert edge_layers([], first=True, last_dense=True) == set()


@pytest.mark.parametrize("value, expected", [
    ("paper", ["block1/conv1", "block1/conv2", "fc"]),
    ("kernels", ["stem", "block1/conv1", "block1/conv2", "fc", "head"]),
    (None, ["stem", "block1/conv1", "block1/conv2", "fc", "head"]),
    (kure_jax.LayerRule(include="fc"), ["fc"]),
])
def test_as_rule_reads_config_names(value, expected):
    assert as_rule(value).layers(RULE_PARAMS) == expected


def test_as_rule_returns_a_rule_unchanged_and_names_the_choices():
    rule = kure_jax.LayerRule(exclude="head")
    assert as_rule(rule) is rule
    with pytest.raises(ValueError, match=r"\['paper', 'kernels'\].*'all'"):
        as_rule("all")
    with pytest.raises(ValueError, match="one of"):
        as_rule(3)


def test_path_helpers_take_jax_key_paths():
    # As a user would call them: straight from jax.tree_util.tree_flatten_with_path.
    tree = {"params": {"block": [{"conv": {"kernel": np.ones((3, 3, 1, 2))}}]}}
    [(path, _)] = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert isinstance(path[0], jax.tree_util.DictKey)
    assert path_to_str(path) == "params/block/0/conv/kernel"
    assert kure_jax.selection.layer_path(path) == "block/0/conv"
    assert path_to_str(("params", "conv", "kernel")) == "params/conv/kernel"  # strings still


def test_path_to_str_drops_the_nnx_value_attribute():
    from flax import nnx

    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]]
    assert sorted(path_to_str(p) for p in paths) == ["bias", "kernel"]
