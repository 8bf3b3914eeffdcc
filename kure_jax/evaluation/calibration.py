"""Static activation quantisation for post-training W/A evaluation: calibrate, then apply.

A layer's *input* is quantised with a fixed step calibrated once on training images, as a
deployed integer kernel would, rather than with the max of each test batch:

1. :func:`layer_inputs` records the input of chosen ``nn.Conv``/``nn.Dense`` layers (by module
   path, e.g. ``"conv1"`` or ``"stage1_block1/conv1"``) through QAT's interceptor
   (:func:`kure_jax.qat.linen.layer_interceptor`), so any Flax model works unmodified.
2. :func:`calibrate_activations` runs the float model on the calibration images and turns each
   layer's inputs into a per-tensor step with ``kure_jax.compute_step`` and an activation
   ``QuantPolicy`` (``clip`` max / MSE / ACIQ / percentile). A layer whose calibration inputs
   are all >= 0 (after a ReLU) gets unsigned codes ``0 .. 2^b - 1``, otherwise the symmetric
   signed codes ``-(2^(b-1) - 1) .. 2^(b-1) - 1``. With several calibration batches the steps
   of the batches are combined by their max for ``clip="max"`` (the max over all images) and
   by their mean otherwise.
3. :func:`activation_quantized` wraps an apply function so that those layers see
   ``fake_quant(input, step)``; the steps are an argument (arrays), so one compiled program
   serves any calibration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kure_jax.evaluation.parallel import EvalMesh
from kure_jax.qat.linen import layer_interceptor
from kure_jax.quant import QuantPolicy, fake_quant
from kure_jax.quant.policy import compute_step

__all__ = [
    "ActivationCalibration",
    "activation_quantized",
    "calibrate_activations",
    "layer_inputs",
    "layer_names",
]

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]


class ActivationCalibration(NamedTuple):
    """Calibrated input quantizers of some layers at one bit width.

    Attributes:
      bits: activation bit width.
      steps: layer name -> float32 scalar step (a pytree of arrays: pass it through ``jit``).
      signed: layer name -> whether its codes are signed (static).
    """

    bits: int
    steps: dict[str, jax.Array]
    signed: dict[str, bool]


def layer_names(kernel_paths: Sequence[str]) -> tuple[str, ...]:
    """Module names (``"conv1"``) of kernel paths (``"conv1/kernel"``, ``"params/conv1/kernel"``).

    Raises:
      ValueError: if a path does not end in ``/kernel``.
    """
    names = []
    for path in kernel_paths:
        parts = path.split("/")
        if parts[-1] != "kernel" or len(parts) < 2:
            raise ValueError(
                f"expected a path to a conv/dense kernel ('.../kernel'); got {path!r}."
            )
        names.append("/".join(parts[1:-1] if parts[0] == "params" else parts[:-1]))
    return tuple(names)


def _module_name(module: nn.Module) -> str:
    return "/".join(module.path)


def _intercept_inputs(
    layers: frozenset[str], transform: Callable[[str, jax.Array], jax.Array], seen: set[str]
) -> Callable[..., Any]:
    """Interceptor passing the first argument of the chosen layers' ``__call__`` through
    ``transform(name, inputs)``."""

    def wrap(module, call, args, kwargs):
        name = _module_name(module)
        if name not in layers:
            return call(*args, **kwargs)
        seen.add(name)
        if args:
            return call(transform(name, args[0]), *args[1:], **kwargs)
        if "inputs" not in kwargs:
            raise ValueError(f"layer {name} was called without an input array.")
        return call(**{**kwargs, "inputs": transform(name, kwargs["inputs"])})

    return layer_interceptor(wrap)


def _check_seen(layers: frozenset[str], seen: set[str]) -> None:
    missing = sorted(layers - seen)
    if missing:
        raise ValueError(
            f"layer(s) {missing} were never called as nn.Conv/nn.Dense/nn.ConvTranspose during "
            f"the forward pass; called: {sorted(seen) or 'none'}."
        )


def layer_inputs(
    apply_fn: ApplyFn, variables: PyTree, images: jax.Array, layers: Sequence[str]
) -> dict[str, jax.Array]:
    """The input of each named layer when ``apply_fn(variables, images)`` runs.

    Args:
      apply_fn: ``(variables, images) -> logits`` of a Flax model.
      variables: its variables.
      images: ``(B, H, W, C)``.
      layers: module names (``"/"``-joined module paths) of conv/dense layers.

    Returns:
      name -> the layer's input array (the last call's, if a layer is called twice).

    Raises:
      ValueError: if a named layer is never called.
    """
    chosen, seen, found = frozenset(layers), set(), {}

    def record(name: str, x: jax.Array) -> jax.Array:
        found[name] = x
        return x

    with nn.intercept_methods(_intercept_inputs(chosen, record, seen)):
        apply_fn(variables, images)
    _check_seen(chosen, seen)
    return found


def calibrate_activations(
    apply_fn: ApplyFn,
    variables: PyTree,
    image_batches: Iterable[np.ndarray],
    *,
    layers: Sequence[str],
    bits: Sequence[int],
    clip: str = "max",
    percentile: float = 99.99,
    mesh: EvalMesh | None = None,
) -> dict[int, ActivationCalibration]:
    """Per-layer static input steps from calibration images, for each activation bit width.

    Args:
      apply_fn: the float ``(variables, images) -> logits`` (the inputs are recorded with float
        weights and float upstream activations).
      variables: model variables.
      image_batches: calibration images, an iterable of ``(B, H, W, C)`` float arrays (held
        in memory: each is used twice, for the signs and then for the steps).
      layers: module names of the layers whose inputs get quantised.
      bits: activation bit widths to calibrate.
      clip: a ``kure_jax.CLIP_METHODS`` name for the range of each layer's inputs.
      percentile: for ``clip="percentile"``.
      mesh: run the calibration forward passes with each batch sharded over its devices
        (``variables`` replicated on them; in calls of ``mesh.micro_batch`` rows if set);
        the recorded layer inputs are gathered and the steps computed on them as on one
        device.

    Returns:
      bits -> :class:`ActivationCalibration`.

    Raises:
      ValueError: for no calibration images, a layer that is never called, or an invalid
        ``clip`` / ``bits`` (from ``QuantPolicy``).
    """
    batches = [np.asarray(b) for b in image_batches]
    if not batches or not any(b.shape[0] for b in batches):
        raise ValueError("calibrate_activations needs at least one calibration image.")
    layers = tuple(layers)
    record = lambda v, x: layer_inputs(apply_fn, v, x, layers)
    if mesh is None:
        inputs_of = jax.jit(record)
    else:
        # Each device records its rows' layer inputs; the steps are then computed on the
        # gathered inputs, as on one device.
        gather = mesh.per_device(mesh.micro_batched(record), replicated=1, batched=1)

        def inputs_of(v: PyTree, images: np.ndarray) -> dict[str, jax.Array]:
            placed, rows = mesh.shard_rows(images)
            inputs = gather(v, placed)
            if placed.shape[0] == rows:
                return inputs
            return mesh.jit(lambda t: {name: x[:rows] for name, x in t.items()})(inputs)

    compile_ = jax.jit if mesh is None else mesh.jit
    minimum = compile_(lambda inputs: {name: jnp.min(x) for name, x in inputs.items()})
    recorded = [inputs_of(variables, images) for images in batches]
    minima = {name: np.inf for name in layers}
    for inputs in recorded:
        for name, value in minimum(inputs).items():
            minima[name] = min(minima[name], float(value))
    signed = {name: bool(value < 0) for name, value in minima.items()}
    policies = {
        (b, name): QuantPolicy(bits=b, signed=signed[name], clip=clip, percentile=percentile)
        for b in bits for name in layers
    }

    @compile_
    def batch_steps(inputs: dict[str, jax.Array]) -> dict[tuple[int, str], jax.Array]:
        return {k: compute_step(inputs[k[1]], p)[0] for k, p in policies.items()}

    per_batch = [batch_steps(inputs) for inputs in recorded]
    combine = jnp.max if clip == "max" else jnp.mean
    return {
        b: ActivationCalibration(
            bits=b,
            steps={n: combine(jnp.stack([s[(b, n)] for s in per_batch])) for n in layers},
            signed=dict(signed),
        )
        for b in bits
    }


def activation_quantized(
    apply_fn: ApplyFn, *, bits: int, signed: Mapping[str, bool]
) -> Callable[[PyTree, Mapping[str, jax.Array], jax.Array], jax.Array]:
    """``apply(variables, steps, images)``: ``apply_fn`` with the named layers' inputs
    fake-quantised, ``fake_quant(x, steps[name], bits=bits, signed=signed[name])``.

    Signed layers use the symmetric narrow grid ``+-(2^(b-1) - 1)``, unsigned ones
    ``0 .. 2^b - 1`` (negative inputs become 0). Rounding is to nearest (ties to even);
    the straight-through gradient of ``fake_quant`` applies.

    Args:
      apply_fn: ``(variables, images) -> logits``.
      bits: activation bit width.
      signed: layer name -> signedness (e.g. ``ActivationCalibration.signed``).

    Returns:
      A pure function; ``steps`` maps every name of ``signed`` to a positive scalar. Calling
      it raises ValueError if a named layer is never called.
    """
    chosen = frozenset(signed)

    def apply(variables: PyTree, steps: Mapping[str, jax.Array], images: jax.Array) -> jax.Array:
        def quantise(name: str, x: jax.Array) -> jax.Array:
            return fake_quant(x, steps[name], bits=bits, signed=signed[name],
                              narrow_range=signed[name])

        seen: set[str] = set()
        with nn.intercept_methods(_intercept_inputs(chosen, quantise, seen)):
            logits = apply_fn(variables, images)
        _check_seen(chosen, seen)
        return logits

    return apply
