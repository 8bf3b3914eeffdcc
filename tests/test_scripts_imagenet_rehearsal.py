"""The ImageNet path end to end on CPU (scripts/imagenet_rehearsal.py): a random torchvision
ResNet-18 (NumPy, safetensors) -> ``python -m kure_jax.models.convert`` -> ``train.py --config
configs/imagenet_resnet18_kure.py --config.init_from=...`` for 2 steps on TFDS's mock
imagenet2012 at 224x224 -> ``eval.py`` with a cut-down tiny sweep, both on 8 simulated CPU
devices. The stages run once per module (about a minute of CPU time), each in its own process."""

import importlib.util
import json

import jax
import numpy as np
import pytest
from _training_helpers import ROOT

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("safetensors")

from kure_jax.training import restore_for_eval

STEPS, BATCH, EXAMPLES, DEVICES = 2, 8, 8, 8


def _script():
    spec = importlib.util.spec_from_file_location(
        "imagenet_rehearsal", ROOT / "scripts" / "imagenet_rehearsal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rehearsal = _script()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``(out, summary)`` of one rehearsal with the script's defaults."""
    out = tmp_path_factory.mktemp("rehearsal")
    summary = rehearsal.rehearse(out, steps=STEPS, batch_size=BATCH, num_examples=EXAMPLES,
                                 devices=DEVICES)
    for name, stage in summary["stages"].items():
        if stage["exit_code"] != 0:
            tail = "\n".join((out / f"{name}.log").read_text().splitlines()[-40:])
            pytest.fail(f"stage {name} failed with exit code {stage['exit_code']}:\n{tail}")
    return out, summary


@pytest.mark.slow
def test_every_stage_ran_and_train_and_eval_saw_8_cpu_devices(run):
    out, summary = run
    assert summary["ok"] and list(summary["stages"]) == ["convert", "train", "eval"]
    assert json.loads((out / "rehearsal.json").read_text()) == summary
    for name in ("train", "eval"):
        stage = summary["stages"][name]
        assert (stage["device_count"], stage["platform"]) == (DEVICES, "cpu"), name
    for stage in summary["stages"].values():
        assert stage["seconds"] > 0 and stage["cpu_seconds"] > 0
    assert len(summary["stages"]["train"]["step_seconds"]) == STEPS


@pytest.mark.slow
def test_conversion_wrote_the_torchvision_weights(run):
    out, _ = run
    assert (out / "tv_resnet18" / "checkpoints" / "0").is_dir()
    config, _, variables = restore_for_eval(out / "tv_resnet18")
    assert (config.model, config.num_classes) == ("resnet18", 1000)
    torch_names = rehearsal.random_torchvision_resnet18(seed=0)  # what the script wrote
    np.testing.assert_array_equal(variables["params"]["stem_conv"]["kernel"],
                                  torch_names["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"],
                                  torch_names["fc.weight"].T)
    np.testing.assert_array_equal(variables["batch_stats"]["stage3_block1"]["proj_norm"]["var"],
                                  torch_names["layer3.0.downsample.1.running_var"])


@pytest.mark.slow
def test_train_ran_from_the_converted_weights(run):
    out, _ = run
    records = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text()
               .splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) and r["kure"] > 0 for r in train)
    assert [(r["step"], r["count"]) for r in evals] == [(STEPS, EXAMPLES)]
    assert sorted(p.name for p in (out / "train" / "checkpoints").iterdir()) == [str(STEPS)]

    config, model, trained = restore_for_eval(out / "train", which="latest")
    _, _, converted = restore_for_eval(out / "tv_resnet18")
    assert config.init_from == str(out / "tv_resnet18") and config.batch_size == BATCH
    import optax

    from kure_jax.training import create_train_state

    # What train.py would have started from without init_from: the same seed's random init
    # (parameter values depend on the key and shapes only, not on the image size).
    fresh = create_train_state(model, rng=jax.random.key(config.seed), input_shape=(32, 32, 3),
                               tx=optax.sgd(0.0)).params
    relative = lambda a, b: float(np.linalg.norm(np.asarray(a) - np.asarray(b))
                                  / np.linalg.norm(np.asarray(b)))
    stem = trained["params"]["stem_conv"]["kernel"]
    assert relative(stem, fresh["stem_conv"]["kernel"]) > 0.5  # not the random init
    assert 0 < relative(stem, converted["params"]["stem_conv"]["kernel"]) < 1e-2  # moved a bit
    # Every kernel: 2 SGD steps at lr 1e-3 from the converted values.
    kernels = {jax.tree_util.keystr(path): (leaf, old) for (path, leaf), old in zip(
        jax.tree_util.tree_leaves_with_path(trained["params"]),
        jax.tree.leaves(converted["params"]), strict=True) if np.ndim(leaf) >= 2}
    assert len(kernels) == 21  # 20 convs (stem, 16 in blocks, 3 projections) + the classifier
    changes = {name: relative(new, old) for name, (new, old) in kernels.items()}
    assert max(changes.values()) < 1e-2, changes
    assert min(changes.values()) > 0, changes


@pytest.mark.slow
def test_eval_report_has_fp_and_quantized_points_over_the_mock_split(run):
    out, _ = run
    data = json.loads((out / "eval" / "results.json").read_text())
    assert data["complete"]
    kinds = [p["kind"] for p in data["points"]]
    # tiny.py with weight.bits=(4,), one W/A pair and 3 step ratios (rehearsal.EVAL_SETS).
    assert sorted(kinds) == sorted(
        ["fp", "weight", "weight", "weight_act", "step_ratio", "step_ratio", "step_ratio"])
    assert all(p["count"] == EXAMPLES for p in data["points"])
    assert all(0.0 <= p["accuracy"] <= 1.0 and np.isfinite(p["loss"]) for p in data["points"])
    (checkpoint,) = data["checkpoints"]
    assert (checkpoint["model"], checkpoint["dataset"], checkpoint["num_test_images"]) == (
        "resnet18", "imagenet2012", EXAMPLES)
    if "devices" in data:  # eval.py's data-parallel evaluation records its device count
        assert data["devices"] == DEVICES
    report = (out / "eval" / "report.md").read_text()
    assert "W4A4" in report and (out / "eval" / "results.csv").is_file()


@pytest.mark.slow
def test_eval_reads_the_dataset_options_the_checkpoint_was_trained_with(run, tmp_path):
    import tensorflow_datasets as tfds

    from kure_jax.evaluation import load_checkpoint

    out, _ = run
    # The checkpoint's manual_dir (OUT/tfds/downloads/manual) holds the two tars; the mock's
    # data_dir here (what a builder without data_dir gets) has none.
    with tfds.testing.mock_data(num_examples=EXAMPLES, data_dir=str(tmp_path)):
        loaded = load_checkpoint(str(out / "train"), which="latest")
    assert loaded.dataset.num_eval_examples == EXAMPLES


def test_rehearse_refuses_a_used_out_directory_and_a_batch_that_does_not_divide(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="is not empty"):
        rehearsal.rehearse(tmp_path)
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        rehearsal.rehearse(tmp_path / "new", batch_size=12)
    assert not (tmp_path / "new").exists()
    assert rehearsal.main(["--out", str(tmp_path)]) == 2


def test_device_env_sets_the_simulated_device_count():
    env = rehearsal.device_env(4, {"XLA_FLAGS": "--xla_foo=1 "
                                                 "--xla_force_host_platform_device_count=8"})
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu" and str(ROOT) in env["PYTHONPATH"]
