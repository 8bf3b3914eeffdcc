"""Leaf selection: default rule, predicates, the paper's selection on real Flax params."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kure_jax.selection import paper_selection, path_to_str, select, selection_mask


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
