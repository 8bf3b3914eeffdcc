"""The torchvision converter without torch: a hand-built state dict of NumPy arrays, written with
``safetensors.numpy``, on a tiny ResNet-18 layout. The full models are checked against
torchvision itself in tests/with_torch (``make test-torch``)."""

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from kure_jax.models import get_model
from kure_jax.models.convert import (
    convert_state_dict,
    load_state_dict,
    main,
    write_checkpoint,
)
from kure_jax.training import create_train_state, restore_for_eval

WIDTHS = (4, 8, 8, 8)  # tiny stage widths; torchvision's names and layouts otherwise
CLASSES = 3


def _bn(rng, prefix, channels, out):
    out[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    out[f"{prefix}.bias"] = rng.normal(size=channels).astype(np.float32)
    out[f"{prefix}.running_mean"] = rng.normal(size=channels).astype(np.float32)
    out[f"{prefix}.running_var"] = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    out[f"{prefix}.num_batches_tracked"] = np.array(5, np.int64)


def _tiny_resnet18_state_dict(seed=0):
    """torchvision resnet18 names, written out here independently of the converter."""
    rng = np.random.default_rng(seed)
    sd = {"conv1.weight": rng.normal(size=(WIDTHS[0], 3, 7, 7)).astype(np.float32)}
    _bn(rng, "bn1", WIDTHS[0], sd)
    in_ch = WIDTHS[0]
    for s, width in enumerate(WIDTHS, start=1):
        for b in range(2):
            p = f"layer{s}.{b}"
            sd[f"{p}.conv1.weight"] = rng.normal(size=(width, in_ch, 3, 3)).astype(np.float32)
            _bn(rng, f"{p}.bn1", width, sd)
            sd[f"{p}.conv2.weight"] = rng.normal(size=(width, width, 3, 3)).astype(np.float32)
            _bn(rng, f"{p}.bn2", width, sd)
            if b == 0 and s > 1:  # stride 2 (and a width change): a projection shortcut
                sd[f"{p}.downsample.0.weight"] = rng.normal(
                    size=(width, in_ch, 1, 1)).astype(np.float32)
                _bn(rng, f"{p}.downsample.1", width, sd)
            in_ch = width
    sd["fc.weight"] = rng.normal(size=(CLASSES, WIDTHS[-1])).astype(np.float32)
    sd["fc.bias"] = rng.normal(size=CLASSES).astype(np.float32)
    return sd


@pytest.fixture(scope="module")
def state_dict():
    return _tiny_resnet18_state_dict()


@pytest.fixture(scope="module")
def converted(state_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(state_dict, str(path))
    return convert_state_dict("resnet18", load_state_dict(path),
                              model_options={"stage_widths": WIDTHS})


def test_mapping_layouts_and_names(state_dict, converted):
    params, stats = converted["params"], converted["batch_stats"]
    # OIHW -> HWIO, element by element.
    w = state_dict["conv1.weight"]
    k = params["stem_conv"]["kernel"]
    assert k.shape == (7, 7, 3, WIDTHS[0]) and k.dtype == np.float32
    o, i, h, x = 2, 1, 5, 3
    assert k[h, x, i, o] == w[o, i, h, x]
    # Linear (out, in) -> Dense (in, out).
    np.testing.assert_array_equal(params["head"]["kernel"], state_dict["fc.weight"].T)
    np.testing.assert_array_equal(params["head"]["bias"], state_dict["fc.bias"])
    # BatchNorm: weight/bias -> scale/bias, running stats -> batch_stats; blocks count from 1.
    block = "layer2.0.downsample.1"
    np.testing.assert_array_equal(params["stage2_block1"]["proj_norm"]["scale"],
                                  state_dict[f"{block}.weight"])
    np.testing.assert_array_equal(stats["stage2_block1"]["proj_norm"]["var"],
                                  state_dict[f"{block}.running_var"])
    np.testing.assert_array_equal(stats["stage4_block2"]["norm2"]["mean"],
                                  state_dict["layer4.1.bn2.running_mean"])
    np.testing.assert_array_equal(params["stage3_block2"]["conv1"]["kernel"],
                                  state_dict["layer3.1.conv1.weight"].transpose(2, 3, 1, 0))
    model = get_model("resnet18", num_classes=CLASSES, stage_widths=WIDTHS)
    expected = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    shapes = lambda tree: jax.tree.map(np.shape, tree)
    assert shapes(converted) == shapes(dict(expected))


def test_stem_conv_matches_a_numpy_convolution(state_dict, converted):
    # The torch convention computed directly: out[n, o, y, x] = sum_{i,h,w} W[o, i, h, w] *
    # in_padded[n, i, 2y + h, 2x + w] (stride 2, padding 3), against the kure_jax conv.
    import flax.linen as nn

    rng = np.random.default_rng(1)
    images = rng.normal(size=(1, 3, 12, 12)).astype(np.float32)
    w = state_dict["conv1.weight"]
    padded = np.pad(images, ((0, 0), (0, 0), (3, 3), (3, 3)))
    want = np.zeros((1, WIDTHS[0], 6, 6), np.float32)
    for y in range(6):
        for x in range(6):
            patch = padded[:, :, 2 * y:2 * y + 7, 2 * x:2 * x + 7]
            want[:, :, y, x] = np.einsum("nihw,oihw->no", patch, w)
    conv = nn.Conv(WIDTHS[0], (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False)
    got = conv.apply({"params": converted["params"]["stem_conv"]}, images.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-5, atol=1e-5)


def test_checkpoint_is_read_by_restore_for_eval_and_init_from(converted, tmp_path):
    step_dir = write_checkpoint(tmp_path / "tv", converted, arch="resnet18",
                                model_options={"stage_widths": WIDTHS}, source="tiny")
    assert step_dir == (tmp_path / "tv" / "checkpoints" / "0").absolute()
    config, model, variables = restore_for_eval(tmp_path / "tv")
    assert (config.model, config.num_classes, config.kure.lambda_) == ("resnet18", CLASSES, 0.0)
    assert tuple(config.model_options.stage_widths) == WIDTHS
    jax.tree.map(np.testing.assert_array_equal, variables,
                 {k: converted[k] for k in ("params", "batch_stats")})
    import optax  # what train.py's init_from does with them

    state = create_train_state(model, rng=jax.random.key(0), input_shape=(32, 32, 3),
                               tx=optax.sgd(0.1), pretrained=variables)
    jax.tree.map(np.testing.assert_array_equal, state.params, converted["params"])
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        write_checkpoint(tmp_path / "tv", converted, arch="resnet18")


def _without(sd, key):
    return {k: v for k, v in sd.items() if k != key}


@pytest.mark.parametrize("edit, match", [
    (lambda sd: _without(sd, "layer3.1.bn2.running_var"),
     r"1 missing \(first: 'layer3.1.bn2.running_var' \(expected \(8,\), for "
     r"batch_stats/stage3_block2/norm2/var\)\)"),
    (lambda sd: {**sd, "layer5.0.conv1.weight": np.zeros((2, 2, 3, 3), np.float32)},
     r"1 unexpected \(first: 'layer5.0.conv1.weight' \(2, 2, 3, 3\)\)"),
    (lambda sd: {**sd, "layer1.0.conv1.weight": np.zeros((4, 4, 1, 1), np.float32)},
     r"1 mismatched \(first: 'layer1.0.conv1.weight' is \(4, 4, 1, 1\), expected "
     r"\(4, 4, 3, 3\)"),
    (lambda sd: _without(sd, "fc.weight"), r"classifier weight 'fc.weight' .* is missing"),
])
def test_a_state_dict_that_does_not_match_names_the_key(state_dict, edit, match):
    with pytest.raises(ValueError, match=match):
        convert_state_dict("resnet18", edit(state_dict), model_options={"stage_widths": WIDTHS})


def test_another_arch_and_unknown_arch(state_dict):
    with pytest.raises(ValueError, match=r"resnet50 .*missing \(first: 'layer1.0.conv3"):
        convert_state_dict("resnet50", state_dict, model_options={"stage_widths": WIDTHS})
    with pytest.raises(ValueError, match=r"unknown arch 'vgg16'.*mobilenet_v2"):
        convert_state_dict("vgg16", state_dict)


def test_cli_errors_are_one_line(state_dict, tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    save_file(state_dict, str(weights))
    assert main(["--arch", "vgg16", "--weights", str(weights), "--out", str(tmp_path / "o")]) == 2
    assert main(["--arch", "resnet18", "--weights", str(tmp_path / "none.pth"),
                 "--out", str(tmp_path / "o")]) == 2
    # Standard width: the tiny weights do not fit ResNet-18.
    out = str(tmp_path / "o")
    assert main(["--arch", "resnet18", "--weights", str(weights), "--out", out]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert "unknown arch" in lines[0] and "does not exist" in lines[1]
    assert "does not match torchvision resnet18" in lines[2] and "mismatched" in lines[2]
    assert not (tmp_path / "o").exists()
