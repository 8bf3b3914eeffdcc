"""Sweep configs and the families of points (kure_jax/evaluation/families/): each family owns
its config section, its planning and its report; the registry is the only other place that
knows it. The configs are ml_collections files that import the default (no runpy)."""

import ast
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.sweeps import default, multibit, runtimes, tiny
from kure_jax.evaluation import Sweep, evaluate, evaluate_model, make_eval_step
from kure_jax.evaluation import families as families_pkg
from kure_jax.evaluation._types import Family, Task
from kure_jax.evaluation.families import FAMILIES, step_ratio, weight
from kure_jax.evaluation.report import POINT_FIELDS

ROOT = pathlib.Path(__file__).parent.parent
PACKAGE = ROOT / "kure_jax" / "evaluation"


# ------------------------------------------------------------------------- sweep configs


def test_default_sweep_file_matches_family_defaults():
    sweep = Sweep.from_config(default.get_config())
    assert list(sweep.families) == list(FAMILIES)  # every family on, in registry order
    for name, cfg in sweep.families.items():
        assert cfg == FAMILIES[name].parse({}, {}), name  # the file sets each default
    assert Sweep.from_config(sweep.to_dict()) == sweep
    ratios = sweep.families["step_ratio"].ratios()
    assert len(ratios) == 61 and ratios[30] == pytest.approx(1.0)


def test_variants_import_the_default():
    for module in (tiny, multibit, runtimes):
        text = pathlib.Path(module.__file__).read_text()
        assert "from configs.sweeps import default" in text and "runpy" not in text
        Sweep.from_config(module.get_config())


def test_config_overrides_and_absent_sections():
    config = tiny.get_config()
    config.weight.bits = (5, 3)
    config.layers = "kernels"
    config.step_ratio.num = 9
    sweep = Sweep.from_config(config)
    assert sweep.families["weight"].bits == (5, 3) and sweep.layers == "kernels"
    assert sweep.families["step_ratio"].num == 9
    only = Sweep.from_config({"weight": {"bits": (4,)}})  # absent sections are off
    assert list(only.families) == ["weight"]
    assert only.families["weight"].quantizers == weight.DEFAULT_QUANTIZERS


@pytest.mark.parametrize("config, message", [
    ({"bitz": 3}, "unknown sweep key 'bitz'; closest: "),
    ({"wieght": {}}, "unknown sweep key 'wieght'; closest: weight, weight_act"),
    ({"weight": {"bitz": 3}}, "unknown sweep key 'weight.bitz'; closest: weight.bits"),
    ({"report": {"plot": True}}, "unknown sweep key 'report.plot'; closest: report.plots"),
    ({"weight": {"bits": (8, 1)}}, r"ints in \[2, 16\]"),
    ({"weight": {"quantizers": {"x": {"clipp": "max"}}}}, "unknown QuantPolicy field"),
    ({"weight": {"quantizers": {"x": {"clip": "minmax"}}}}, "weight.quantizers.x.*clip"),
    ({"weight_act": {"weight_quantizer": "nope"}}, "must name one of weight.quantizers"),
    ({"weight_act": {"act_clip": "nope"}}, "act_clip"),
    ({"weight_act": {"pairs": ((8,),)}}, "pairs"),
    ({"step_ratio": {"quantizer": "stochastic"}}, "deterministic"),
    ({"step_ratio": {"start": 1.2, "stop": 0.8}}, "start <= stop"),
    ({"nested": {"bits": (4,), "nest_bits": 3}}, "must not exceed 'nested.nest_bits'"),
    ({"runtimes": {"schemes": ("tflite/int8",)}}, "unknown runtime"),
    ({"layers": "some"}, "sweep key 'layers'.*'paper', 'kernels'"),
    ({"map_chunk": 0}, "'map_chunk' must be an int >= 1"),
    ({"qat": {"step_ratio": 1}}, "True or False"),
    ({"fp": {"bits": 3}}, "unknown sweep key 'fp.bits'"),
])
def test_sweep_config_errors(config, message):
    with pytest.raises(ValueError, match=message):
        Sweep.from_config(config)


# ------------------------------------------------------------------ the families' registry


def _string_constants(path: pathlib.Path) -> set[str]:
    """Every string literal of a module, less docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings}


def _kind_constants(path: pathlib.Path) -> set[str]:
    """String literals used as a point kind: ``kind=...``, ``Task(kind, ...)``-style keyword
    values and comparisons with something subscripted by ``"kind"`` (for the kinds whose name
    is also a point field, such as ``"step_ratio"``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.keyword) and node.arg == "kind":
            found |= {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
        if isinstance(node, ast.Compare) and "'kind'" in ast.unparse(node):
            found |= {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}
    return {value for value in found if isinstance(value, str)}


def test_each_point_kind_is_named_in_its_family_only():
    registry = PACKAGE / "families" / "__init__.py"
    paths = [*PACKAGE.rglob("*.py"), ROOT / "eval.py"]
    # Kinds that are also field names: a checkpoint entry's "qat", a runtime policy's "runtime".
    fields = {*POINT_FIELDS, "qat", "runtime"}
    for name, family in FAMILIES.items():
        assert family.name == name
        home = pathlib.Path(_module_of(family))
        for kind in family.kinds:
            read = _kind_constants if kind in fields else _string_constants
            named = {path for path in paths if kind in read(path)}
            assert named <= {home, registry}, (kind, sorted(map(str, named)))
            assert kind in _string_constants(home), kind


def _module_of(family: Family) -> str:
    return family.plan.__code__.co_filename


# ------------------------------------------------------- a new family is one module


def _noise_family() -> Family:
    """A family as a new module would define it: weights plus Gaussian noise."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class NoiseConfig:
        scales: tuple[float, ...] = (0.1,)

    def plan(ctx, cfg):
        def task(scale):
            def run():
                key = jax.random.key(0)
                noisy = jax.tree.map(lambda w: w + scale * jax.random.normal(key, w.shape),
                                     ctx.float_vars)
                metrics = evaluate(ctx.fp_step, noisy, ctx.batches())
                return [ctx.point("noise", "gauss", metrics, step_ratio=scale)]
            return Task(kind="noise", quantizer="gauss", num_points=1, run=run)
        return [task(s) for s in cfg.scales]

    def tables(data, by_group):
        points = [p for p in data["points"] if p["kind"] == "noise"]
        return [f"### Noise\n\n{len(points)} noise points"] if points else []

    return Family(name="noise", kinds=("noise",),
                  parse=lambda section, config: NoiseConfig(**section), plan=plan, tables=tables)


def test_a_new_family_needs_only_its_module_and_registry_entry(monkeypatch, tmp_path):
    monkeypatch.setitem(families_pkg.FAMILIES, "noise", _noise_family())
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}}
    images = rng.normal(size=(16, 4)).astype(np.float32)
    labels = rng.integers(0, 3, size=16)
    apply_fn = lambda p, x: x @ p["dense"]["kernel"]
    sweep = Sweep.from_config({"layers": "kernels", "fp": {}, "noise": {"scales": (0.0, 0.5)}})
    data = evaluate_model(apply_fn, params, [(images, labels)], sweep, out=tmp_path,
                          progress=False)
    fp, noise0, noise5 = data["points"]
    assert [p["kind"] for p in data["points"]] == ["fp", "noise", "noise"]
    assert noise0["accuracy"] == fp["accuracy"] and noise0["loss"] == fp["loss"]
    expected = evaluate(make_eval_step(lambda v, x: apply_fn(v["params"], x)),
                        {"params": params}, [{"image": images, "label": labels,
                                              "mask": np.ones(16, np.float32)}])
    assert fp["accuracy"] == expected.accuracy
    assert noise5["loss"] != fp["loss"]
    assert "2 noise points" in (tmp_path / "report.md").read_text()
    assert data["sweep"]["noise"] == {"scales": [0.0, 0.5]}


def test_step_ratio_grid_is_shared_with_qat():
    sweep = Sweep.from_config({"step_ratio": {"start": 0.5, "stop": 1.5, "num": 3}, "qat": {}})
    np.testing.assert_allclose(step_ratio.grid_of(sweep.families), [0.5, 1.0, 1.5])


# ----------------------------------------------------------------- the formats family


def test_formats_points_equal_a_numpy_forward_pass_of_the_quantised_kernels(tmp_path):
    """Each ``formats.names`` preset: the kernels in that data type (kure_jax.quant.formats,
    tested against ml_dtypes casts in its own tests), the rest of the model float; accuracy and
    loss equal a NumPy forward pass of those kernels."""
    from kure_jax.quant.formats import fake_quant_format

    rng = np.random.default_rng(0)
    params = {"hidden": {"kernel": rng.normal(size=(64, 32)).astype(np.float32),
                         "bias": rng.normal(size=32).astype(np.float32) * 0.1},
              "head": {"kernel": rng.normal(size=(32, 10)).astype(np.float32) * 0.3,
                       "bias": np.zeros(10, np.float32)}}
    images = rng.normal(size=(40, 64)).astype(np.float32)

    def np_logits(p):
        p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
        h = np.maximum(images @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
        return h @ p["head"]["kernel"] + p["head"]["bias"]

    labels = np_logits(params).argmax(1)
    labels[::4] = rng.integers(0, 10, 10)  # some wrong: accuracy can move both ways
    apply_fn = lambda p, x: jax.nn.relu(x @ p["hidden"]["kernel"] + p["hidden"]["bias"]) @ p[
        "head"]["kernel"] + p["head"]["bias"]
    names = ("fp8_e4m3", "mxfp4", "nvfp4", "int4_block32")
    sweep = Sweep.from_config({"layers": "kernels", "formats": {"names": names}})
    data = evaluate_model(apply_fn, params, [(images, labels)], sweep, out=tmp_path,
                          progress=False)
    assert [(p["kind"], p["quantizer"]) for p in data["points"]] == [("format", n)
                                                                     for n in names]
    for point in data["points"]:
        quantized = {layer: {"kernel": np.asarray(fake_quant_format(v["kernel"],
                                                                    point["quantizer"])),
                             "bias": v["bias"]} for layer, v in params.items()}
        logits = np_logits(quantized)
        shifted = logits - logits.max(1, keepdims=True)
        loss = -np.mean(shifted[np.arange(40), labels] - np.log(np.exp(shifted).sum(1)))
        assert point["accuracy"] == np.mean(logits.argmax(1) == labels), point["quantizer"]
        assert point["loss"] == pytest.approx(loss, rel=1e-5)
    assert {p["quantizer"]: p["weight_bits"] for p in data["points"]} == {
        "fp8_e4m3": 8, "mxfp4": 4, "nvfp4": 4, "int4_block32": 4}
    assert "### Weight-only data types" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match=r"'formats\.names': 'fp7' is not a format"):
        Sweep.from_config({"formats": {"names": ("fp7",)}})
