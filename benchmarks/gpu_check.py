"""On-device correctness of the compiled Pallas kernels against the jnp path (run before timing).

The interpret-mode tests (tests/test_kernels.py) check the kernels' logic on CPU; this script
checks what only a device run can: that Triton/Mosaic compile them, and how far the compiled
arithmetic is from XLA's (Triton's float32 division may differ in the last bit, which can move
a value sitting on a rounding boundary by one step).

Run: ``python benchmarks/gpu_check.py`` on a GPU/TPU (``--small`` runs it in interpret mode).
"""

from __future__ import annotations

import _common
import jax
import jax.numpy as jnp
import numpy as np

import kure_jax
from kure_jax import quant
from kure_jax.models import get_model
from kure_jax.quant.policy import QuantPolicy

SHAPE = (3001, 517)  # Not a multiple of any block size.
STEPS = {"tensor": (), "col": (1, SHAPE[1]), "row": (SHAPE[0], 1)}


def _mismatch(a, b, step) -> dict[str, float]:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    diff = np.abs(a - b) / np.asarray(step, np.float32)
    return {"mismatch_frac": float(np.mean(a != b)), "max_diff_steps": float(diff.max())}


def _check_fake_quant(rec, dtype, interpret) -> None:
    kw = {"impl": "pallas", "interpret": interpret}
    x = jax.random.normal(jax.random.key(0), SHAPE, dtype) * 2
    g = jax.random.normal(jax.random.key(1), SHAPE, dtype)
    for grouping, step_shape in STEPS.items():
        s = 0.3 * jnp.exp(0.2 * jax.random.normal(jax.random.key(2), step_shape))
        ours = jax.jit(lambda x, s: jax.vjp(lambda x, s: quant.fake_quant(x, s, bits=4, **kw),
                                            x, s))
        ref = jax.jit(lambda x, s: jax.vjp(lambda x, s: quant.fake_quant(x, s, bits=4), x, s))
        (y, vjp), (y_ref, vjp_ref) = ours(x, s), ref(x, s)
        (gx, gs), (gx_ref, gs_ref) = vjp(g), vjp_ref(g)
        rel = float(jnp.max(jnp.abs(gs - gs_ref)) / jnp.max(jnp.abs(gs_ref)))
        rec.add({"check": f"fake_quant {grouping}", "dtype": dtype.__name__,
                 **_mismatch(y, y_ref, s), "grad_x_mismatch_frac": float(jnp.mean(gx != gx_ref)),
                 "grad_step_rel_err": rel})
        axis = {"tensor": None, "col": -1, "row": 0}[grouping]
        policy = QuantPolicy(bits=4, axis=axis)
        y = jax.jit(lambda x, policy=policy: kure_jax.quantize(x, policy, **kw))(x)
        y_ref = kure_jax.quantize(x, policy)
        rec.add({"check": f"absmax_fake_quant {grouping}", "dtype": dtype.__name__,
                 **_mismatch(y, y_ref, jnp.max(jnp.abs(x)) / 7)})
        sr = lambda impl, s=s: jax.jit(lambda x, s: quant.fake_quant(
            x, s, bits=4, rounding="stochastic", key=jax.random.key(3), impl=impl,
            noise="hash", interpret=interpret))(x, s)
        rec.add({"check": f"stochastic {grouping} (kernel vs jnp hash)", "dtype": dtype.__name__,
                 **_mismatch(sr("pallas"), sr("jnp"), s)})


def _check_penalty(rec, interpret) -> None:
    model = get_model("resnet50", num_classes=1000)
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 64, 64, 3)), train=False))(
        jax.random.key(0))["params"]
    ours = jax.jit(jax.value_and_grad(lambda p: kure_jax.penalty(p, impl="pallas",
                                                                 interpret=interpret)))
    ref = jax.jit(jax.value_and_grad(kure_jax.penalty))
    # Also weights with a std of ~1e-10: the kernels work in units of each tensor's scale.
    for scale in (1.0, 1e-8):
        scaled = jax.tree.map(lambda w, scale=scale: w * scale, params)
        (v, g), (v_ref, g_ref) = ours(scaled), ref(scaled)
        errs = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True)
                if float(jnp.max(jnp.abs(b))) > 0]
        rec.add({"check": f"penalty resnet50 x{scale:g}", "dtype": "float32",
                 "value_rel_err": float(abs(v - v_ref) / abs(v_ref)),
                 "grad_rel_err_max": max(errs)})


def _extra(parser) -> None:
    parser.add_argument("--checks", default="fake_quant_f32,fake_quant_bf16,penalty",
                        help="Comma-separated subset of fake_quant_f32, fake_quant_bf16, penalty.")


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], _extra)
    interpret = args.small or jax.default_backend() == "cpu"
    rec = _common.Recorder("gpu_check", args, {"interpret": interpret})
    checks = {"fake_quant_f32": (_check_fake_quant, (jnp.float32,)),
              "fake_quant_bf16": (_check_fake_quant, (jnp.bfloat16,)),
              "penalty": (_check_penalty, ())}
    for fn, fn_args in [checks[name] for name in args.checks.split(",")]:
        try:
            fn(rec, *fn_args, interpret)
        except Exception as e:  # Report a kernel that does not compile, then continue.
            rec.add({"check": fn.__name__, "args": str(fn_args),
                     "error": f"{type(e).__name__}: {e}"[:500]})
    rec.note("mismatch_frac: share of elements that differ from the jnp path; max_diff_steps: "
             "largest difference in quantisation steps (1 = one rounding boundary).")
    rec.save()
    print(rec.markdown())


if __name__ == "__main__":
    main()
