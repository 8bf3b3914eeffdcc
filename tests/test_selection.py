"""Leaf selection: default rule, predicates, the paper's selection on real Flax params."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kure_jax
from kure_jax.selection import (
    as_rule,
    edge_layers,
    paper_selection,
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


def test_paper_selection_excludes_first_conv_and_last_dense(flax_variables):
    where = paper_selection(flax_variables)
    names = {name for name, _ in select(flax_variables, where)}
    assert "params/Conv_0/kernel" not in names
    assert "params/Dense_1/kernel" not in names
    assert {"params/Conv_1/kernel", "params/Conv_10/kernel", "params/Conv_11/kernel"} <= names
    assert "params/Dense_0/kernel" in names
    assert len(names) == 12


def test_paper_selection_applies_with_or_without_params_key(flax_variables):
    where = paper_selection(flax_variables)
    inner = {name for name, _ in select(flax_variables["params"], where)}
    assert len(inner) == 12 and "Conv_0/kernel" not in inner


class NamedOutOfOrderNet(nn.Module):
    """Layer names whose alphabetical order is the reverse of the call order."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="z_first")(x)
        x = nn.Conv(4, (3, 3), name="a_second")(x)
        x = nn.Dense(4, name="b_hidden")(x.mean(axis=(1, 2)))
        return nn.Dense(2, name="a_out")(x)


def test_paper_selection_uses_call_order_of_eager_init():
    variables = NamedOutOfOrderNet().init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))
    names = {name for name, _ in select(variables, paper_selection(variables))}
    assert names == {"params/a_second/kernel", "params/b_hidden/kernel"}


def test_paper_selection_errors():
    with pytest.raises(ValueError, match="conv kernels"):
        paper_selection({"Dense_0": {"kernel": np.ones((3, 4))}})
    with pytest.raises(ValueError, match="leaves nothing"):
        paper_selection({"Conv_0": {"kernel": np.ones((3, 3, 1, 2))}})


def test_predicate_receives_string_paths():
    seen = []
    tree = {"a": [np.ones((2, 2)), {"kernel": np.ones((2, 2))}]}
    select(tree, lambda path, leaf: seen.append(path) or True)
    assert seen == [("a", "0"), ("a", "1", "kernel")]
    assert path_to_str(("a", "1", "kernel")) == "a/1/kernel"


def test_paper_selection_prefers_layer_names_over_order():
    # Sorted (non call-order) dict, as jax.jit(model.init) returns: names decide.
    params = {
        "block": {"kernel": np.ones((3, 3, 4, 4))},
        "head": {"kernel": np.ones((4, 2))},
        "proj": {"kernel": np.ones((4, 4))},
        "stem_conv": {"kernel": np.ones((3, 3, 1, 4))},
    }
    names = {name for name, _ in select(params, paper_selection(params))}
    assert names == {"block/kernel", "proj/kernel"}


def test_paper_selection_explicit_names(flax_variables):
    where = paper_selection(flax_variables, first_conv="Conv_3", last_dense="Dense_0")
    names = {name for name, _ in select(flax_variables, where)}
    assert "params/Conv_3/kernel" not in names and "params/Dense_0/kernel" not in names
    assert "params/Conv_0/kernel" in names and "params/Dense_1/kernel" in names
    with pytest.raises(ValueError, match="matches no kernel"):
        paper_selection(flax_variables, first_conv="nope")


# ---------------------------------------------------------------------------------------------
# LayerRule: the one rule type behind paper_selection, QAT's float layers and the sweep.

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


def test_paper_selection_is_the_paper_rule_on_unnamed_models():
    where = paper_selection(RULE_PARAMS)
    assert [n for n, _ in select(RULE_PARAMS, where)] == [
        n for n, _ in select(RULE_PARAMS, kure_jax.PAPER_LAYERS)]


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
