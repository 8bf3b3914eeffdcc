"""KURE penalty (+ gradient) over ResNet-18/50 parameters vs one copy and one SGD update of them.

Question: what does the KURE term cost relative to the memory traffic a training step already
spends on the same parameters? Rows, all over the same float32 params pytree:

* ``copy``: ``-p`` for every leaf (the bandwidth yardstick; 2 units of the params' size);
* ``sgd``: one ``optax.sgd(0.1)`` update (read params and grads, write params: 3 units);
* ``sgd+momentum``: ``optax.sgd(0.1, momentum=0.9)`` (the paper's optimizer: 5 units);
* ``penalty``, ``penalty+grad``: ``kure_jax.penalty`` (jnp: XLA) and
  ``kure_jax.penalty(impl="pallas")`` (Pallas: one launch reads all selected kernels; the
  gradient is one more read + write).

The issue's goal: penalty + gradient in less time than 2 copies (``vs_copy < 2``).

Run: ``python benchmarks/kure_penalty.py`` (GPU/TPU) or ``--small`` (CPU: jnp path only; the
Pallas kernels would run in interpret mode, which measures nothing useful).
"""

from __future__ import annotations

import functools

import _common
import jax
import jax.numpy as jnp
import optax

import kure_jax
from kure_jax.models import get_model


def _params(name: str):
    model = get_model(name, num_classes=1000)
    # Parameter shapes do not depend on the image size (global average pooling).
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 64, 64, 3)), train=False))(
        jax.random.key(0))
    return variables["params"]


def _rows(params, on_cpu: bool):
    sgd, momentum = optax.sgd(0.1), optax.sgd(0.1, momentum=0.9)
    grads = jax.tree.map(jnp.ones_like, params)
    mom_state = momentum.init(params)

    def update(tx, state):
        def step(p, g):
            updates, _ = tx.update(g, state, p)
            return optax.apply_updates(p, updates)
        return step

    rows = [
        ("copy", "xla", lambda p, g: jax.tree.map(jnp.negative, p)),
        ("sgd", "optax", update(sgd, sgd.init(params))),
        ("sgd+momentum", "optax", update(momentum, mom_state)),
        ("penalty", "jnp", lambda p, g: kure_jax.penalty(p)),
        ("penalty+grad", "jnp", lambda p, g: jax.value_and_grad(kure_jax.penalty)(p)),
    ]
    if not on_cpu:
        pen = functools.partial(kure_jax.penalty, impl="pallas")
        rows += [("penalty", "pallas", lambda p, g: pen(p)),
                 ("penalty+grad", "pallas", lambda p, g: jax.value_and_grad(pen)(p))]
    return rows, grads


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0])
    on_cpu = jax.default_backend() == "cpu"
    repeats, calls = args.repeats or (5 if on_cpu else 10), args.calls or (3 if on_cpu else 20)
    rec = _common.Recorder("kure_penalty", args, {"repeats": repeats, "calls": calls})
    for model_name in ("resnet18", "resnet50"):
        params = _params(model_name)
        n_all = sum(x.size for x in jax.tree.leaves(params))
        selected = kure_jax.select(params)
        n_sel = sum(leaf.size for _, leaf in selected)
        rows, grads = _rows(params, on_cpu)
        times = {}
        for op, impl, fn in rows:
            try:
                t = _common.time_call(jax.jit(fn), (params, grads), repeats=repeats, calls=calls)
            except Exception as e:
                rec.add({"model": model_name, "op": op, "impl": impl,
                         "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            times[(op, impl)] = t["median_s"]
            rec.add({"model": model_name, "params": n_all, "selected": f"{len(selected)} "
                     f"tensors, {n_sel} elements", "op": op, "impl": impl,
                     "time_us": 1e6 * t["median_s"],
                     "vs_copy": t["median_s"] / times[("copy", "xla")],
                     "vs_sgd_momentum": (t["median_s"] / times[("sgd+momentum", "optax")]
                                         if ("sgd+momentum", "optax") in times else None),
                     "compile_s": t["first_call_s"]})
        for op in ("penalty", "penalty+grad"):
            if (op, "pallas") in times:
                rec.note(f"{model_name} {op}: pallas is "
                         f"{times[(op, 'jnp')] / times[(op, 'pallas')]:.2f}x the jnp speed.")
    rec.note("vs_copy = time / time of one copy of all params; goal: penalty+grad < 2 copies.")
    rec.note("Selection: the default (every conv/dense kernel), float32 params.")
    rec.save()
    print(rec.markdown())


if __name__ == "__main__":
    main()
