"""The training configs in configs/: each recipe's key fields, the shared bases, no runpy.

Every recipe is a delta on ``configs/base.py`` (ImageNet ones on ``configs/imagenet_base.py``),
imported as a module. The pinned values are the recipes' as they stood before that refactor
(when each file ran another through ``runpy``), so a base change that leaks into a recipe shows
here. ``test_training_step.py`` validates the same configs against ``validate_config``.
"""

import ast
import importlib
import importlib.util

import ml_collections
import pytest
from _training_helpers import ROOT, load_config

CONFIGS = ROOT / "configs"
BASES = ("base", "imagenet_base")
RECIPES = sorted(p.stem for p in CONFIGS.glob("*.py") if p.stem not in (*BASES, "__init__"))

_MNIST = {"model": "small_cnn", "dataset": "mnist5k", "dataset_options.max_shift": 2,
          "num_classes": 10, "batch_size": 128, "eval_batch_size": 1000, "num_epochs": 10.0,
          "optimizer.name": "sgd", "optimizer.momentum": 0.9, "optimizer.nesterov": True,
          "learning_rate": 0.02, "weight_decay": 5e-4, "schedule.name": "cosine",
          "kure.lambda_": 1.0, "kure.target": 1.8, "kure.selection": "paper",
          "qat.enabled": False, "log_every_steps": 50, "checkpoint_every_steps": 0}
_IMAGENET = {"dataset": "imagenet2012", "dataset_options.data_dir": None,
             "dataset_options.manual_dir": None, "num_classes": 1000, "batch_size": 256,
             "eval_batch_size": 500, "num_epochs": 90.0, "optimizer.name": "sgd",
             "optimizer.momentum": 0.9, "optimizer.nesterov": False, "learning_rate": 1e-3,
             "weight_decay": 1e-4, "schedule.name": "step", "schedule.milestones": (30, 60),
             "schedule.gamma": 0.1, "kure.lambda_": 1.0, "kure.target": 1.8,
             "kure.selection": "paper", "kure.reduction": "mean", "qat.enabled": False,
             "log_every_steps": 100, "eval_every_steps": 0, "checkpoint_every_steps": 1000,
             # The paper fine-tunes torchvision weights: a placeholder the user must set.
             "init_from": None}
_DOREFA = {**_IMAGENET, "model": "resnet18", "num_epochs": 80.0, "learning_rate": 1e-4,
           "schedule.milestones": (30, 60, 85, 95), "qat.enabled": True, "qat.weight_bits": 4,
           "qat.act_bits": 4, "qat.weight_quantizer": "dorefa", "qat.act_quantizer": "dorefa",
           "qat.layers": "paper"}
_MATRYOSHKA = {**_MNIST, "kure.lambda_": 0.0, "num_epochs": 5.0, "qat.enabled": True,
               "qat.weight_quantizer": "matryoshka", "qat.weight_bits": 4, "qat.act_bits": None,
               "qat.bits": (8, 4, 2), "qat.multibit": "sum", "qat.bn_per_bits": False}
_FASHION = {"model": "resnet20", "model_options.stage_sizes": (1, 1, 1),
            "dataset": "fashion_mnist", "dataset_options.data_dir": None,
            "dataset_options.max_shift": 2, "dataset_options.flip": True,
            "dataset_options.num_train": None, "num_classes": 10, "batch_size": 128,
            "eval_batch_size": 1000, "num_epochs": 1.5, "optimizer.nesterov": True,
            "learning_rate": 0.1, "weight_decay": 5e-4, "schedule.name": "cosine",
            "kure.lambda_": 1.0, "kure.target": 1.8, "kure.selection": "paper",
            "qat.enabled": False}
_FASHION_QAT = {**_FASHION, "qat.enabled": True, "qat.weight_bits": 4, "qat.act_bits": 4,
                "qat.weight_quantizer": "lsq", "qat.act_quantizer": "lsq"}
_FASHION_DOREFA = {**_FASHION_QAT, "qat.weight_quantizer": "dorefa",
                   "qat.act_quantizer": "dorefa"}
EXPECTED = {
    # Fashion-MNIST, ResNet-8 (docs/datasets.md): float with/without KURE, W4A4 QAT x 2 x 2.
    "fashion_mnist_kure": _FASHION,
    "fashion_mnist_baseline": {**_FASHION, "kure.lambda_": 0.0},
    "fashion_mnist_lsq_w4a4": {**_FASHION_QAT, "kure.lambda_": 0.0},
    "fashion_mnist_lsq_w4a4_kure": _FASHION_QAT,
    "fashion_mnist_dorefa_w4a4": {**_FASHION_DOREFA, "kure.lambda_": 0.0},
    "fashion_mnist_dorefa_w4a4_kure": _FASHION_DOREFA,
    "mnist5k_kure": _MNIST,
    "mnist5k_baseline": {**_MNIST, "kure.lambda_": 0.0},
    "mnist5k_qat_w4a4": {**_MNIST, "qat.enabled": True, "qat.weight_quantizer": "lsq",
                         "qat.act_quantizer": "lsq", "learning_rate": 0.05,
                         "model_options.hidden_norm": False},
    # Multi-bit QAT: one model at 8, 4 and 2 bits (Any-Precision DNN, Matryoshka Quantization).
    "mnist5k_anyprecision": {**_MNIST, "kure.lambda_": 0.0, "num_epochs": 5.0,
                             "qat.enabled": True, "qat.weight_quantizer": "dorefa",
                             "qat.act_quantizer": "dorefa", "qat.weight_bits": 4,
                             "qat.act_bits": 4, "qat.bits": (8, 4, 2), "qat.multibit": "sum",
                             "qat.bn_per_bits": True, "model_options.hidden_norm": True},
    "mnist5k_matryoshka": _MATRYOSHKA,
    "mnist5k_matryoshka_kure": {**_MATRYOSHKA, "kure.lambda_": 1.0},
    "cifar10_resnet20": {"model": "resnet20", "dataset": "cifar10",
                         "dataset_options.data_dir": None, "dataset_options.download": False,
                         "num_classes": 10,
                         "batch_size": 128, "num_epochs": 160.0, "optimizer.nesterov": False,
                         "learning_rate": 0.1, "weight_decay": 1e-4, "schedule.name": "step",
                         "schedule.milestones": (80, 120), "kure.lambda_": 1.0,
                         "log_every_steps": 100},
    "imagenet_resnet18_kure": {**_IMAGENET, "model": "resnet18"},
    "imagenet_resnet50_kure": {**_IMAGENET, "model": "resnet50", "batch_size": 128,
                               "num_epochs": 50.0, "schedule.milestones": (30,)},
    "imagenet_mobilenet_v2_kure": {**_IMAGENET, "model": "mobilenet_v2", "num_epochs": 83.0},
    "imagenet_resnet18_dorefa_w4a4": _DOREFA,
    "imagenet_resnet18_lsq_w4a4": {**_DOREFA, "qat.weight_quantizer": "learned_clip",
                                   "qat.act_quantizer": "learned_clip"},
}


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def _structure(config):
    """Nested field names, ignoring the free-form model_options / dataset_options."""
    return {k: _structure(v) if isinstance(v, ml_collections.ConfigDict)
            and k not in ("model_options", "dataset_options") else None
            for k, v in config.items()}


def test_every_recipe_is_pinned():
    assert sorted(EXPECTED) == RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_key_fields(name):
    config = load_config(name)
    got = {field: _get(config, field) for field in EXPECTED[name]}
    assert got == EXPECTED[name]
    for field, value in EXPECTED[name].items():  # 10 == 10.0 above: the types must match too
        assert type(_get(config, field)) is type(value), field
    assert _structure(config) == _structure(load_config("base"))
    assert config == load_config(name, "")  # "" (the command line's "file.py:") is the default


@pytest.mark.parametrize("name", RECIPES)
def test_tiny_variant_and_bad_variant(name):
    tiny = load_config(name, "tiny")
    assert tiny.num_train_steps == 6
    with pytest.raises(ValueError, match="variant must be '' or 'tiny'"):
        load_config(name, "huge")


def test_mnist_tiny_shrinks_model_and_batch():
    tiny = load_config("mnist5k_qat_w4a4", "tiny")
    assert tiny.model_options.to_dict() == {"features": (8, 16), "hidden": 32,
                                            "hidden_norm": False}
    assert (tiny.batch_size, tiny.eval_batch_size) == (32, 200)
    assert (tiny.log_every_steps, tiny.eval_every_steps, tiny.checkpoint_every_steps) == (2, 3, 3)


def test_placeholders_keep_their_type():
    options = load_config("imagenet_resnet50_kure").dataset_options
    options.manual_dir = "/data/manual"  # a str placeholder: a str is accepted
    with pytest.raises(TypeError):
        options.data_dir = 3


@pytest.mark.parametrize("name", [r for r in RECIPES if r.startswith("imagenet_")])
def test_imagenet_recipes_are_fine_tunes_from_init_from(name):
    # PAPER.md "Recipes": every ImageNet run starts from torchvision-pretrained weights, so the
    # docstring tells how to set init_from (converted with kure_jax.models.convert), and the
    # old "cannot load those yet" caveat is gone.
    config = load_config(name)
    config.init_from = "/runs/tv_resnet18"  # a str placeholder: a path is accepted
    doc = (CONFIGS / f"{name}.py").read_text()
    assert "--config.init_from=" in doc and "cannot load" not in doc and "yet" not in doc


def test_import_by_module_name_matches_load_by_path():
    module = importlib.import_module("configs.imagenet_resnet18_lsq_w4a4")
    assert module.get_config() == load_config("imagenet_resnet18_lsq_w4a4")


def _config_imports(path):
    """The ``configs`` modules that a config file imports, and whether it uses runpy."""
    tree = ast.parse(path.read_text())
    imported, runpy = set(), False
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "configs":
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("configs."):
            imported.add(node.module.removeprefix("configs."))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [
                a.name for a in node.names]
            runpy |= "runpy" in names
        elif isinstance(node, ast.Name | ast.Attribute):
            runpy |= getattr(node, "id", getattr(node, "attr", None)) in ("run_path", "runpy")
    return imported, runpy


@pytest.mark.parametrize("name", [*BASES, *RECIPES])
def test_configs_import_bases_not_run_files(name):
    imported, uses_runpy = _config_imports(CONFIGS / f"{name}.py")
    assert not uses_runpy
    if name == "base":
        assert not imported
        return
    assert imported and imported <= {*BASES, *RECIPES}, imported
    # A recipe builds on the bases or on a recipe of its own dataset, never on another's.
    dataset = load_config(name).dataset
    for parent in imported - set(BASES):
        assert load_config(parent).dataset == dataset, (name, parent)


def test_bases_leave_model_to_the_recipe():
    for name in BASES:
        assert load_config(name).model == ""
    spec = importlib.util.find_spec("configs.base")
    assert spec is not None and spec.origin == str(CONFIGS / "base.py")
