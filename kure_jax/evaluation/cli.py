"""The ``eval.py`` application: its flags, the one-line error contract, and a user's model
named by string (``--model MODULE:FACTORY``).

Everything here is application code (argv, importing a user's module, printing); the engine
(:func:`~kure_jax.evaluation.run_sweep`, :func:`~kure_jax.evaluation.evaluate_model`) takes
Python objects. Flags are absl flags; the sweep is an ``ml_collections`` config file loaded
with ``config_flags.DEFINE_config_file(..., lock_config=True)``, so ``--sweep.weight.bits='(4,
2)'`` overrides a key and a misspelt key stops at start-up naming the closest keys.

Exit codes of :func:`main`: 0 done; 2 a bad flag, sweep file or key, output directory,
checkpoint, model or params, non-finite weights, or a missing package of a real runtime (one
``error:`` line on stderr, no traceback); 130 interrupted.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import logging
import os
import pathlib
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from kure_jax.evaluation.factory import (
    ModelError,
    first_line,
    load_params,
    model_from_factory,
)
from kure_jax.evaluation.forward import check_apply
from kure_jax.evaluation.parallel import EvalMesh
from kure_jax.evaluation.runner import AfterTask, evaluate_model
from kure_jax.evaluation.sweep import Sweep, test_batches

__all__ = ["UsageError", "check_out", "evaluate_factory", "load_factory", "load_sweep_file", "main",
           "parse_flags"]


class UsageError(ValueError):
    """A bad command line: a flag, the sweep file or key, or ``--out``."""


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """The current directory first on ``sys.path`` (as ``python -m``), for the import only."""
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


def load_factory(ref: str) -> Callable[[], Any]:
    """Imports ``MODULE:FACTORY`` (``MODULE`` dotted, or a path ending in ``.py``).

    Raises:
      ModelError: for a malformed reference, a module that cannot be imported (naming it and
        its import error), or a missing or non-callable attribute (listing what it defines).
    """
    module_name, sep, attr = ref.rpartition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise ModelError(f"--model {ref!r}: expected MODULE:FACTORY, e.g. my_models:make.")
    try:
        if module_name.endswith(".py"):
            path = pathlib.Path(module_name)
            if not path.is_file():
                raise ModelError(f"--model {ref}: no such file {module_name}.")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            with _cwd_on_path():
                module = importlib.import_module(module_name)
    except ModelError:
        raise
    except BaseException as err:  # the user's module may raise anything while importing
        if isinstance(err, KeyboardInterrupt):
            raise
        raise ModelError(f"--model {ref}: module {module_name!r} cannot be imported "
                         f"({first_line(err)}).") from err
    factory = getattr(module, attr, None)
    if factory is None:
        defined = sorted(k for k, v in vars(module).items()
                         if callable(v) and not k.startswith("_"))
        raise ModelError(f"--model {ref}: module {module_name!r} has no attribute {attr!r} "
                         f"(it defines: {', '.join(defined) or 'nothing callable'}).")
    if not callable(factory):
        raise ModelError(f"--model {ref}: {attr!r} is a {type(factory).__name__}, not a "
                         "callable factory.")
    return factory


def evaluate_factory(
    ref: str,
    params_path: str | pathlib.Path,
    dataset: str,
    sweep: Sweep,
    *,
    out: str | pathlib.Path,
    name: str | None = None,
    progress: bool | None = None,
    after_task: AfterTask | None = None,
    mesh: EvalMesh | None = None,
) -> dict[str, Any]:
    """``eval.py --model REF --params PATH --dataset NAME``: the robustness report of a user's
    model on a registered dataset, via :func:`~kure_jax.evaluation.evaluate_model`.

    The test split is batched by ``sweep.eval_batch_size`` as for checkpoints; a Linen model's
    W/A points are calibrated on the dataset's training images as for checkpoints, so the
    same weights give the same points as ``eval.py --checkpoint``.

    Args:
      ref: ``MODULE:FACTORY`` (module docstring).
      params_path: an Orbax checkpoint directory or a ``.safetensors`` file.
      dataset: a ``kure_jax.data.get_dataset`` name, e.g. ``"mnist5k"``.
      sweep: the sweep.
      out: output directory.
      name: the model's label (default: ``MODULE:FACTORY`` with the module's last part).
      progress, after_task, mesh: as in :func:`~kure_jax.evaluation.evaluate_model` (with
        ``mesh``, the batch is ``sweep.eval_batch_size`` rounded up to a multiple of its
        device count, each process reading its share).

    Returns:
      The results dict, as written to ``results.json``.

    Raises:
      ModelError: for a factory that cannot be imported or called, params that do not fit,
        or images of the dataset that the model rejects.
      ValueError: for a dataset that is unknown, not on disk or lacks its backend (from
        ``get_dataset``), or a selection that matches no kernel.
    """
    from kure_jax.data import get_dataset

    factory = load_factory(ref)  # before the dataset: a typo fails fast
    try:
        data = get_dataset(dataset)
    except (FileNotFoundError, ImportError) as err:  # not on disk / backend not installed
        raise ValueError(f"dataset {dataset}: {first_line(err)}") from err
    try:
        obj = factory()
    except Exception as err:
        raise ModelError(f"--model {ref}: the factory raised {first_line(err)}.") from err
    model = model_from_factory(obj, tuple(data.image_shape))
    params = load_params(params_path, model.template)
    try:
        check_apply(model.apply_fn, params, tuple(data.image_shape), num_classes=data.num_classes)
    except ValueError as err:
        raise ModelError(f"--model {ref} on dataset {dataset} ({data.num_classes} classes): "
                         f"{err}") from err
    module_part, _, attr = ref.rpartition(":")
    short = (pathlib.Path(module_part).stem if module_part.endswith(".py")
             else module_part.rpartition(".")[2])
    label = name or f"{short}:{attr}"
    batch_size = sweep.eval_batch_size if mesh is None else mesh.global_batch_size(
        sweep.eval_batch_size)
    return evaluate_model(
        model.apply_fn, params, test_batches(data, batch_size, mesh), sweep,
        out=out, name=label, progress=progress, module=model.module,
        calibration=data if model.module else None,
        metadata={"path": str(pathlib.Path(params_path).absolute()), "model": ref,
                  "model_kind": model.kind, "dataset": dataset,
                  "num_test_images": int(data.num_eval_examples)},
        after_task=after_task, mesh=mesh)


# ------------------------------------------------------------------------------------- flags


def _define(fv: flags.FlagValues, argv: list[str], default_sweep: str) -> None:
    config_flags.DEFINE_config_file(
        "sweep", default_sweep, "Sweep config file (configs/sweeps/*.py); override its keys "
        "with --sweep.KEY=VALUE, e.g. --sweep.weight.bits='(4, 2)'.",
        flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_multi_string("checkpoint", None, "[GROUP=]DIR: a train.py workdir, "
                              "checkpoints/ or best/ directory or step directory (repeatable).",
                              flag_values=fv)
    flags.DEFINE_string("model", None, "MODULE:FACTORY: your own model instead of "
                        "--checkpoint (a factory returning a Linen/NNX module or (apply_fn, "
                        "params_template)).", flag_values=fv)
    flags.DEFINE_string("params", None, "With --model: an Orbax checkpoint directory or a "
                        ".safetensors file.", flag_values=fv)
    flags.DEFINE_string("dataset", None, "With --model: the dataset, e.g. mnist5k.",
                        flag_values=fv)
    flags.DEFINE_string("name", None, "With --model: its label in the report "
                        "(default: MODULE:FACTORY).", flag_values=fv)
    flags.DEFINE_string("out", "runs/eval", "Output directory.", flag_values=fv)
    flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint of a workdir to use: "
                      "best eval accuracy or latest.", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show the progress bar (when stderr is a terminal); "
                      "--noprogress hides it.", flag_values=fv)
    flags.DEFINE_integer("devices", None, "Evaluate on the first N devices only "
                         "(default: all).", flag_values=fv)
    flags.DEFINE_integer("micro_batch", None, "Rows per model call on each device: with it "
                         "set, the points are bit-identical on any device/process count.",
                         flag_values=fv)
    flags.DEFINE_bool("distributed", False, "Multi-host run (TPU pod, GPU hosts): call "
                      "jax.distributed.initialize() first; run the same command on every "
                      "host.", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "With --distributed outside a detected "
                        "cluster: process 0's HOST:PORT.", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "With --distributed and --coordinator_address.",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "With --distributed and --coordinator_address.",
                         flag_values=fv)


_RENAMED = {"--set": "--sweep.KEY=VALUE", "--no-progress": "--noprogress",
            "--no_progress": "--noprogress"}


def _sweep_first(argv: Sequence[str], default: str) -> tuple[str, list[str]]:
    """The sweep file of ``argv`` (``--sweep FILE``/``--sweep=FILE``, else ``default``) and
    ``argv`` with it first as ``--sweep=FILE``: ml_collections applies ``--sweep.KEY=VALUE``
    only after the file, and to the default when the flag is defined without one."""
    rest, path, skip = [], default, False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg in ("--sweep", "-sweep") and i + 1 < len(argv):
            path, skip = argv[i + 1], True
        elif re.match(r"^--?sweep=", arg):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return path, [f"--sweep={path}", *rest]


def load_sweep_file(path: str | pathlib.Path) -> Any:
    """``get_config()`` of a sweep file, as ``--sweep`` reads it (no overrides).

    Raises:
      UsageError: one line, for a missing file, one without ``get_config`` or one that fails.
    """
    file = pathlib.Path(path)
    if not file.is_file():
        raise UsageError(f"sweep file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(f"_sweep_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if get_config is None:
            raise UsageError(f"sweep file {path} defines no get_config().")
        return get_config()
    except UsageError:
        raise
    except Exception as err:  # the user's file may raise anything
        raise UsageError(f"sweep file {path} failed to load: {first_line(err)}") from err


def _unknown_key(config: Any, dotted: str) -> str | None:
    """Why ``--sweep.<dotted>`` names no key of ``config`` (with the closest keys), or None."""
    node, prefix = config, ""
    for part in dotted.split("."):
        if not hasattr(node, "keys"):
            return None
        if part not in node:
            names = sorted(node.keys())
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.0)
            return (f"unknown sweep key '{prefix}{part}' (in --sweep.{dotted}); closest: "
                    f"{', '.join(prefix + name for name in close) or 'none'}.")
        node, prefix = node[part], f"{prefix}{part}."
    return None


def _flag_error(argv: Sequence[str], config: Any, err: Exception) -> str:
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name in _RENAMED:
            return f"{name} is gone: use {_RENAMED[name]}."
        match = re.match(r"^--?sweep\.([^=]+)", arg)
        problem = match and _unknown_key(config, match[1])
        if problem:
            return problem
    text = str(err.args[0] if isinstance(err, KeyError) and err.args else err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def parse_flags(argv: Sequence[str], *, default_sweep: str) -> flags.FlagValues:
    """Parses eval.py's command line (without the program name) into fresh flag values.

    Raises:
      UsageError: one line, for an unknown flag or sweep key (naming the closest keys), a
        value that does not parse, or a missing or broken sweep file.
    """
    path, argv = _sweep_first(argv, default_sweep)
    config = load_sweep_file(path)
    fv = flags.FlagValues()
    full = [sys.argv[0] if sys.argv else "eval.py", *argv]
    try:
        _define(fv, full, default_sweep)
        rest = fv(full)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        raise UsageError(_flag_error(argv, config, err)) from None
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]}.")
    return fv


def _argument_error(fv: flags.FlagValues) -> str | None:
    """What is wrong with the combination of flags, or ``None``."""
    if fv.model and fv.checkpoint:
        return ("--model and --checkpoint are mutually exclusive: evaluate either train.py "
                "checkpoints or one model of your own per run.")
    if fv.model:
        missing = [f"--{f}" for f in ("params", "dataset") if not fv[f].value]
        return f"--model needs {' and '.join(missing)}." if missing else None
    if not fv.checkpoint:
        return "give --checkpoint DIR (repeatable) or --model MODULE:FACTORY."
    if fv.devices is not None and (fv.devices < 1 or fv.distributed):
        return ("--devices N (>= 1) picks devices of a single-process run; got "
                f"{fv.devices}{' with --distributed' * fv.distributed}.")
    if not fv.distributed and any(fv[f].value is not None for f in (
            "coordinator_address", "num_processes", "process_id")):
        return "--coordinator_address, --num_processes and --process_id need --distributed."
    extra = [f"--{f}" for f in ("params", "dataset", "name") if fv[f].value]
    if extra:
        return (f"{', '.join(extra)} go(es) with --model only (a checkpoint carries its own "
                "weights and dataset).")
    return None


def check_out(out: str | pathlib.Path) -> None:
    """Creates ``out`` and checks that files can be written there.

    Raises:
      UsageError: one line, if ``out`` is a file or cannot be created or written.
    """
    path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
            pass
    except OSError as err:
        raise UsageError(f"--out {out} cannot be written ({first_line(err)}).") from None


def _devices(devices: list, count: int | None) -> list:
    if count is not None and count > len(devices):
        raise UsageError(f"--devices {count}: only {len(devices)} device(s) are present.")
    return devices if count is None else devices[:count]


class _Interrupts:
    """Ctrl-C that cannot be lost inside library code.

    Python raises ``KeyboardInterrupt`` wherever the main thread is when it handles SIGINT;
    inside a Python callback of C code that discards any error of the callback (an attribute
    probe, say) the exception is dropped, and the sweep would run to its end. This handler
    also records the request, and :meth:`check` (called after every task) raises it again.
    """

    def __init__(self) -> None:
        self.requested = False

    def handle(self, signum, frame) -> None:
        self.requested = True
        raise KeyboardInterrupt

    def check(self, *_task_and_points) -> None:
        if self.requested:
            raise KeyboardInterrupt


def _error(message: object) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: Sequence[str], *, default_sweep: str, doc: str = "") -> int:
    """eval.py: parses ``argv`` (without the program name), runs the sweep, prints the summary.

    Returns:
      The exit code (module docstring).
    """
    if "--help" in argv or "-h" in argv or "--helpfull" in argv:
        fv = flags.FlagValues()
        _define(fv, ["eval.py", f"--sweep={default_sweep}"], default_sweep)
        print(doc.strip() + "\n\nflags:\n" + fv.get_help())
        return 0
    try:
        fv = parse_flags(argv, default_sweep=default_sweep)
        problem = _argument_error(fv)
        if problem:
            raise UsageError(problem)
        sweep = Sweep.from_config(fv.sweep)
    except (UsageError, ValueError) as err:
        return _error(err)
    # Orbax logs a warning per read-only restore through absl; keep stderr for real errors.
    logging.getLogger("absl").setLevel(logging.ERROR)
    import jax

    from kure_jax._interrupts import sigint_is_ours
    from kure_jax.evaluation import runner
    from kure_jax.evaluation.families.runtimes import RuntimePackageError
    from kure_jax.evaluation.report import summary_table

    if fv.distributed:
        from kure_jax._distributed import initialize

        initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    chief = jax.process_index() == 0
    interrupts = _Interrupts()
    previous = signal.getsignal(signal.SIGINT)
    if sigint_is_ours():
        signal.signal(signal.SIGINT, interrupts.handle)
    try:
        if chief:
            check_out(fv.out)  # before any checkpoint is restored
        progress = None if fv.progress and chief else False
        mesh = EvalMesh(_devices(jax.devices(), fv.devices), micro_batch=fv.micro_batch)
        if fv.model:
            data = evaluate_factory(fv.model, fv.params, fv.dataset, sweep, out=fv.out,
                                    name=fv.name, progress=progress,
                                    after_task=interrupts.check, mesh=mesh)
        else:
            data = runner.run_sweep(fv.checkpoint, sweep, fv.out, which=fv.which,
                                    progress=progress, after_task=interrupts.check, mesh=mesh)
    except (ValueError, RuntimePackageError) as err:  # CheckpointError, ModelError: ValueErrors
        # The late "Event loop is closed" tracebacks of a failed restore are dropped by the
        # restore (kure_jax/training/_orbax_noise.py): this stays the one line.
        return _error(err)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished points are in {fv.out}/results.json",
              file=sys.stderr)
        return 130
    finally:
        if signal.getsignal(signal.SIGINT) == interrupts.handle:
            signal.signal(signal.SIGINT, previous)
    if not chief:
        return 0  # process 0 prints and writes the report
    grouped = len({c["group"] for c in data["checkpoints"]}) < len(data["checkpoints"])
    print(summary_table(data, by_group=grouped))
    skipped = len(data.get("skipped", []))
    note = f" ({skipped} skipped, reasons in the report)" if skipped else ""
    print(f"\n{len(data['points'])} points{note}; report: {pathlib.Path(fv.out) / 'report.md'}")
    return 0
