"""Stage 2's --precision: what each choice means on each device, and the process-wide float32 matmul switches it sets,
saved and restored around a run (library users call it from notebooks).
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, TypeVar

import torch

from training.cli import UserError

if TYPE_CHECKING:
    from training.sweep_config import SweepConfig

PRECISIONS = ("fp32", "tf32", "bf16")
"""The --precision choices (unset: tf32 on CUDA, fp32 elsewhere)."""
T = TypeVar("T")


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """--precision made concrete: the default (None) is tf32 on CUDA and fp32 elsewhere; tf32 needs CUDA."""
    if precision is None:
        return "tf32" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "tf32" and device.type != "cuda":
        raise UserError(f"--precision tf32 needs a CUDA device: use fp32 (or bf16) on {device.type}")
    return precision


BackendFlags = tuple[tuple[str, bool, bool] | None, tuple[str | None, ...]]
NEW_PRECISION_API = ("fp32_precision", "cuda.matmul.fp32_precision", "cudnn.conv.fp32_precision",
                     "cudnn.rnn.fp32_precision")
"""torch.backends attributes of the newer float32 precision API (torch >= 2.9)."""


def _backend_attr(path: str) -> str | None:
    """torch.backends.<path>, or None where this torch lacks it."""
    try:
        return functools.reduce(getattr, path.split("."), torch.backends)  # type: ignore[arg-type]
    except AttributeError:
        return None


def backend_flags() -> BackendFlags:
    """The process-wide float32 precision switches: the legacy view (float32 matmul precision, CUDA matmul TF32,
    cuDNN TF32; None where torch refuses to report it, in a session that mixed the legacy and newer APIs) and the
    newer API's values."""
    try:
        legacy = (torch.get_float32_matmul_precision(), bool(torch.backends.cuda.matmul.allow_tf32),
                  bool(torch.backends.cudnn.allow_tf32))
    except RuntimeError:
        legacy = None
    return legacy, tuple(_backend_attr(path) for path in NEW_PRECISION_API)


def restore_backend_flags(flags: BackendFlags) -> None:
    """Put back switches saved by `backend_flags` (the matmul precision last: it decides the CUDA TF32 switch)."""
    legacy, new = flags
    if legacy is not None:
        torch.backends.cudnn.allow_tf32 = legacy[2]
        torch.set_float32_matmul_precision(legacy[0])
        return
    for path, value in zip(NEW_PRECISION_API, new):
        if value is not None:
            _set_backend_attr(path, value)


def _set_backend_attr(path: str, value: str) -> None:
    """torch.backends.<path> = value."""
    parent, _, name = path.rpartition(".")
    owner = functools.reduce(getattr, parent.split("."), torch.backends) if parent else torch.backends
    setattr(owner, name, value)


def set_precision(cfg: SweepConfig, device: torch.device) -> Callable[[], ContextManager[Any]]:
    """Set the TF32 switches for --precision (on CUDA) and return the autocast context factory (not restoring the
    switches: use `setup_precision`, or run inside `run_sweep`, which restores them)."""
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda":       # through the legacy API, which keeps torch's two views of the switches consistent
        torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@contextlib.contextmanager
def setup_precision(cfg: SweepConfig, device: torch.device) -> Iterator[Callable[[], ContextManager[Any]]]:
    """Set the TF32 switches for --precision, yield the autocast context factory, restore the switches on exit."""
    saved = backend_flags()
    try:
        yield set_precision(cfg, device)
    finally:
        restore_backend_flags(saved)


def restores_backend_flags(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap `fn` so that the process-wide matmul precision switches are as before when it returns or raises."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        saved = backend_flags()
        try:
            return fn(*args, **kwargs)
        finally:
            restore_backend_flags(saved)
    return wrapper
