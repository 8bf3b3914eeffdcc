"""ResNet-18 training step: float vs +KURE vs W4A4 QAT+KURE (ours) vs W4A4 QAT+KURE (qwix).

Question: what do KURE and fake-quantised training add to a real training step, and is our QAT
as fast as the peer JAX library's? Every config runs the same step (softmax cross-entropy,
``optax.sgd(0.1, momentum=0.9)``, BatchNorm in train mode, ``lambda = 1`` for KURE); only the
forward function and the penalty differ:

* ``fp``: ``model.apply``; ``fp+KURE``: plus ``kure_jax.penalty`` (jnp) or
  ``kure_jax.penalty(impl="pallas")`` (Pallas, ``fp+KURE[pallas]``).
* ``QAT-max+KURE``: ``kure_jax.qat.quantized_apply`` with ``QATConfig(weight_bits=4,
  act_bits=4, weight_quantizer="max", act_quantizer="max")``: dynamic absmax steps, per tensor,
  on every conv/dense kernel and input except the stem conv and the classifier.
* ``QAT-lsq+KURE``: the same with learned LSQ steps (the library default).
* ``QAT-max[pallas]+KURE`` / ``QAT-lsq[pallas]+KURE``: the same with
  ``QATConfig(kernel_impl="pallas")``: the fused fake-quant kernels of ``kure_jax.kernels``
  instead of XLA's fusions of ``quant.fake_quant`` (the penalty stays jnp).
* ``qwix-odml+KURE``: ``qwix.OdmlQatProvider`` W4A4 (int4 weights per channel, int4 outputs of
  every op with moving-average ranges), the same layers excluded. qwix's fake-quant QAT mode;
  it quantises more tensors than ours, so it is the closest peer, not an identical workload.
* ``qwix-qt+KURE``: ``qwix.QtProvider`` W4A4, which runs convolutions on real int4 values
  (not fake quantisation); recorded even when the backend rejects int4 convolutions.
* ``library fp`` / ``library fp+KURE``: ``kure_jax.training.make_train_step``, which also logs
  per-layer kurtosis every step (one more read of the weights).

Run: ``python benchmarks/train_step.py`` (GPU: batch 128 at 224x224) or ``--small`` (CPU:
batch 8 at 64x64). ``--configs a,b`` picks configs, ``--dtypes bfloat16`` picks dtypes.
"""

from __future__ import annotations

import functools

import _common
import jax
import jax.numpy as jnp
import optax

import kure_jax
from kure_jax.models import get_model
from kure_jax.qat import QATConfig, init_quant_from_params, quantized_apply

KEEP_FLOAT = r"(?!stem_conv$|head$).*"  # qwix module-path rule: all layers but stem and head.
CONFIGS = ("fp", "fp+KURE", "QAT-max+KURE", "qwix-odml+KURE", "fp+KURE[pallas]", "QAT-lsq+KURE",
           "library fp+KURE", "qwix-qt+KURE", "library fp", "QAT-max[pallas]+KURE",
           "QAT-lsq[pallas]+KURE")
# (dtype, config) in priority order: run_gpu.sh stops this script at its time limit, and every
# finished row is already saved.
PLAN = (("bfloat16", "fp"), ("bfloat16", "fp+KURE"), ("bfloat16", "QAT-max+KURE"),
        ("bfloat16", "qwix-odml+KURE"), ("bfloat16", "fp+KURE[pallas]"), ("float32", "fp"),
        ("float32", "fp+KURE"), ("bfloat16", "QAT-lsq+KURE"), ("bfloat16", "QAT-lsq[pallas]+KURE"),
        ("bfloat16", "QAT-max[pallas]+KURE"), ("float32", "QAT-max+KURE"),
        ("float32", "qwix-odml+KURE"), ("bfloat16", "library fp+KURE"),
        ("bfloat16", "qwix-qt+KURE"), ("bfloat16", "library fp"))


def _extra(parser) -> None:
    parser.add_argument("--configs", default=None, help=f"Comma-separated subset of {CONFIGS}.")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--image", type=int, default=None)


def _variant(name: str, model, images):
    """``(init_fn, apply_fn, trainable_keys, mutable)`` of a config's forward pass."""
    key = jax.random.key(0)
    float_init = lambda: dict(jax.jit(lambda k: model.init(k, images[:2], train=False))(key))
    float_apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    if name.startswith("QAT"):
        quantizer = "max" if name.startswith("QAT-max") else "lsq"
        impl = "pallas" if "[pallas]" in name.split("+")[0] else "jnp"
        qat = QATConfig(weight_bits=4, act_bits=4, weight_quantizer=quantizer,
                        act_quantizer=quantizer, kernel_impl=impl)

        def init():
            variables = float_init()
            variables["quant"] = init_quant_from_params(model, variables, images[:8], qat=qat,
                                                        train=False)
            return variables

        apply = lambda v, x: quantized_apply(model, v, x, qat=qat, train=True,
                                             mutable=["batch_stats"])
        return init, apply, ("params", "quant")
    if name.startswith("qwix"):
        import qwix

        if name.startswith("qwix-odml"):
            rule = qwix.QuantizationRule(module_path=KEEP_FLOAT, weight_qtype="int4",
                                         act_qtype="int4")
            qmodel = qwix.quantize_model(model, qwix.OdmlQatProvider([rule]))
            mutable = ["batch_stats", "quant_stats"]
        else:
            rule = qwix.QtRule(module_path=KEEP_FLOAT, weight_qtype="int4", act_qtype="int4")
            qmodel = qwix.quantize_model(model, qwix.QtProvider([rule]))
            mutable = ["batch_stats"]
        init = lambda: dict(jax.jit(lambda k: qmodel.init(k, images[:2], train=False))(key))
        apply = lambda v, x: qmodel.apply(v, x, train=True, mutable=mutable)
        return init, apply, ("params",)
    return float_init, float_apply, ("params",)


def _bench_step(name: str, model, batch, timer):
    """Seconds per step of our benchmark step for config ``name``."""
    init, apply, trainable_keys = _variant(name, model, batch["image"])
    penalty = None
    if "KURE" in name:
        penalty = (functools.partial(kure_jax.penalty, impl="pallas") if "KURE[pallas]" in name
                   else kure_jax.penalty)
    tx = optax.sgd(0.1, momentum=0.9)
    variables = init()
    trainable = {k: variables.pop(k) for k in trainable_keys}
    state = {"trainable": trainable, "other": variables, "opt": tx.init(trainable)}

    def loss_fn(trainable, other, batch):
        logits, updates = apply({**trainable, **other}, batch["image"])
        labels = jax.nn.one_hot(batch["label"], logits.shape[-1])
        loss = jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), labels))
        if penalty is not None:
            loss = loss + 1.0 * penalty(trainable["params"])
        return loss, {**other, **updates}

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, batch):
        grads, other = jax.grad(loss_fn, has_aux=True)(state["trainable"], state["other"], batch)
        updates, opt = tx.update(grads, state["opt"], state["trainable"])
        return {"trainable": optax.apply_updates(state["trainable"], updates), "other": other,
                "opt": opt}

    compiled, cost = _compile(step, state, batch)
    return {**timer(lambda state: (compiled(state, batch),), (state,), chain=True), **cost}


def _compile(jitted, *args):
    """The compiled step and XLA's static cost estimate (a cheap profile: FLOPs and bytes)."""
    compiled = jitted.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost or {}
    return compiled, {"hlo_gflop": cost.get("flops", float("nan")) / 1e9,
                      "hlo_GB": cost.get("bytes accessed", float("nan")) / 1e9}


def _library_step(name: str, model, batch, timer):
    """Seconds per step of ``kure_jax.training.make_train_step`` (fp, optionally KURE)."""
    from kure_jax.training import StepConfig, create_train_state, make_train_step

    tx = optax.sgd(0.1, momentum=0.9)
    state = create_train_state(model, rng=jax.random.key(0),
                               input_shape=batch["image"].shape[1:], tx=tx)
    spec = StepConfig(num_classes=1000, kure_lambda=1.0 if "KURE" in name else 0.0)
    step = jax.jit(make_train_step(model, spec), donate_argnums=0)
    compiled, cost = _compile(step, state, batch)
    return {**timer(lambda state: (compiled(state, batch)[0],), (state,), chain=True), **cost}


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], _extra)
    small = args.small or jax.default_backend() == "cpu"
    batch_size = args.batch or (8 if small else 128)
    image = args.image or (64 if small else 224)
    repeats, calls = args.repeats or (3 if small else 5), args.calls or (2 if small else 10)
    rec = _common.Recorder("train_step", args, {"batch": batch_size, "image": image,
                                                "repeats": repeats, "calls": calls})
    timer = functools.partial(_common.time_call, repeats=repeats, calls=calls, warmup=2)
    chosen = args.configs.split(",") if args.configs else None
    bad = [c for c in chosen or () if c not in CONFIGS]
    if bad:
        raise ValueError(f"unknown configs {bad}; choose from {CONFIGS}.")
    images = jax.random.normal(jax.random.key(1), (batch_size, image, image, 3), jnp.float32)
    batch = {"image": images, "label": jnp.arange(batch_size) % 1000}
    dtypes = args.dtypes.split(",")
    plan = [(d, c) for d, c in PLAN if d in dtypes and (chosen is None or c in chosen)]
    plan += [(d, c) for d in dtypes for c in chosen or () if (d, c) not in plan]
    if jax.default_backend() == "cpu":  # Interpret mode is not a performance path.
        plan = [(d, c) for d, c in plan if "[pallas]" not in c]
    base: dict[str, float] = {}
    for dtype, name in plan:
        model = get_model("resnet18", num_classes=1000, dtype=jnp.dtype(dtype))
        run = _library_step if name.startswith("library") else _bench_step
        try:
            t = run(name, model, batch, timer)
        except Exception as e:  # e.g. int4 convolutions the backend cannot compile.
            rec.add({"dtype": dtype, "config": name,
                     "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"[:300]})
            continue
        if name == "fp":
            base[dtype] = t["median_s"]
        rec.add({"dtype": dtype, "config": name, "step_ms": 1e3 * t["median_s"],
                 "min_ms": 1e3 * t["min_s"], "images_per_s": batch_size / t["median_s"],
                 "vs_fp": t["median_s"] / base[dtype] if dtype in base else None,
                 "hlo_gflop": t["hlo_gflop"], "hlo_GB": t["hlo_GB"]})
    for dtype in dtypes:
        _compare(rec, dtype)
    rec.note("hlo_gflop / hlo_GB: XLA's static cost analysis of the compiled step (FLOPs and "
             "bytes accessed), the profile that explains a step-time difference.")
    rec.save()
    print(rec.markdown())


def _compare(rec: _common.Recorder, dtype: str) -> None:
    t = {r["config"]: r["step_ms"] for r in rec.rows if r["dtype"] == dtype and "step_ms" in r}
    if "fp" in t and "fp+KURE" in t:
        rec.note(f"{dtype}: KURE adds {100 * (t['fp+KURE'] / t['fp'] - 1):+.1f}% (goal < 3%).")
    for ours in ("QAT-max+KURE", "QAT-lsq+KURE"):
        if ours in t and "fp+KURE" in t:
            rec.note(f"{dtype}: {ours} adds {100 * (t[ours] / t['fp+KURE'] - 1):+.1f}% to "
                     "fp+KURE (goal: W4A4 QAT < 25%).")
        if ours in t and "qwix-odml+KURE" in t:
            rec.note(f"{dtype}: {ours} / qwix-odml+KURE step time = "
                     f"{t[ours] / t['qwix-odml+KURE']:.2f} (goal <= 1).")
        kernel = ours.replace("+", "[pallas]+", 1)
        if ours in t and kernel in t:
            rec.note(f"{dtype}: {kernel} / {ours} step time = {t[kernel] / t[ours]:.2f} "
                     "(< 1: the fake-quant kernels pay inside the step).")


if __name__ == "__main__":
    main()
