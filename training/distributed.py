"""Running one job on several processes with `torch.distributed`, launched by `torchrun` (or anything that sets its
environment variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

A `Shard` says which process this is (rank of world_size) and carries its collectives; every collective here goes
through a gloo group on the host (small objects and CPU tensors: metrics, checkpoint shards), with a timeout
(SAE_DIST_TIMEOUT seconds, default 1800), so a rank that dies makes the others fail, never hang. A rank that raises
publishes "rank R failed: ..." in the job's store before it exits; the others, whose next collective then fails,
raise that same line (`failures`). Without WORLD_SIZE > 1 everything here is the identity on one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Sequence, TypeVar

import torch

from training.cli import UserError

T = TypeVar("T")
TIMEOUT_ENV = "SAE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
"""Seconds a collective waits for the other ranks (saves and evaluations of big sweeps happen inside one)."""
FAILED_KEY = "sae/failed"
"""The store key under which the first rank that fails publishes its error line."""


class PeerFailure(UserError):
    """A collective failed because another rank stopped: the line that rank published, or one naming the loss."""


def timeout_s() -> float:
    """The collective timeout in seconds (SAE_DIST_TIMEOUT, default DEFAULT_TIMEOUT_S)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise UserError(f"{TIMEOUT_ENV} must be positive (got {raw})")
    return value


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment ((0, 1, 0) without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (launch with torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK {rank} is not within WORLD_SIZE {world} (launch with torchrun)")
    return rank, world, local


def member_slices(n: int, world_size: int) -> list[list[int]]:
    """The global member indices each rank trains: contiguous runs in rank order, sizes differing by at most one."""
    return [list(range(n * r // world_size, n * (r + 1) // world_size)) for r in range(world_size)]


@dataclass
class Shard:
    """This process's place in the job: `rank` of `world_size`, `local_rank` on its node, and the host group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0: the one that writes shared files and prints."""
        return self.rank == 0

    def device(self, name: str | None) -> str | None:
        """The device of this rank for --device `name`: with several ranks, cuda (or the default, where CUDA is
        present) becomes cuda:<local rank>; cpu and explicit cuda:N are kept."""
        if self.world_size == 1:
            return name
        if name == "cuda" or (name is None and torch.cuda.is_available()):
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}"
        return name

    # ------------------------------------------------------------------ collectives (identity on one process)

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        _collective(lambda: torch.distributed.all_gather_object(out, obj, group=self.group))
        return out

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        _collective(lambda: torch.distributed.gather_object(obj, out, dst=self._global(0), group=self.group))
        return out

    def scatter(self, objs: Sequence[T] | None) -> T:
        """Rank r's item of rank 0's `objs` (one per rank; ignored elsewhere)."""
        if self.world_size == 1:
            assert objs is not None
            return objs[0]
        out: list[Any] = [None]
        _collective(lambda: torch.distributed.scatter_object_list(out, list(objs) if self.is_main else None,
                                                                  src=self._global(0), group=self.group))
        return out[0]

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        _collective(lambda: torch.distributed.broadcast_object_list(box, src=self._global(0), group=self.group))
        return box[0]

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank."""
        return flag if self.world_size == 1 else any(self.all_gather(bool(flag)))

    def barrier(self) -> None:
        """Wait for every rank (with the timeout)."""
        if self.world_size > 1:
            self.all_gather(None)

    def _global(self, rank: int) -> int:
        """The global rank of `rank` of the host group."""
        return rank if self.group is None else torch.distributed.get_global_rank(self.group, rank)

    # ------------------------------------------------------------------ rank 0 does, everyone learns

    def on_main(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call `fn` on rank 0 and hand its result to every rank; a UserError it raises is raised on every rank
        (so a refusal, e.g. a folder in use, is the same one line everywhere)."""
        if self.world_size == 1:
            return fn(*args, **kwargs)
        result: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                result = ("ok", fn(*args, **kwargs))
            except UserError as e:
                result = ("error", str(e))
        kind, value = self.broadcast(result)
        if kind == "error":
            raise UserError(value)
        return value

    @contextlib.contextmanager
    def main_context(self, make: Callable[[], ContextManager[Any]]) -> Iterator[None]:
        """Enter the context `make()` on rank 0 only (e.g. the folder lock, held for the whole job), every rank
        learning whether that worked (a UserError there is raised on every rank)."""
        with contextlib.ExitStack() as stack:
            self.on_main(lambda: stack.enter_context(make()) and None)
            yield


def _collective(call: Callable[[], Any]) -> None:
    """Run a collective; when it fails (a peer died, raised or timed out) raise the failed rank's published error
    line as a UserError, or one naming the lost connection."""
    try:
        call()
    except (RuntimeError, ConnectionError, pickle.PicklingError) as e:
        if isinstance(e, UserError):
            raise
        published = _published_failure()
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        detail = detail.split("] ", 1)[-1].split(". ")[0][:160]          # gloo's "[file:line] Read error ..."
        raise PeerFailure(f"{published}; this rank stopped too" if published else
                          f"another rank stopped or is unreachable ({detail}): see that rank's error line") from None


def _store() -> Any:
    """The job's key-value store (the one the process group was made with), or None."""
    try:
        return torch.distributed.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):
        return None


def _published_failure() -> str | None:
    """The error line a failed rank published, if the store is still reachable."""
    store = _store()
    if store is None:
        return None
    try:
        if store.check([FAILED_KEY]):
            return store.get(FAILED_KEY).decode()
    except (RuntimeError, ConnectionError, OSError):
        return None
    return None


def publish_failure(rank: int, error: BaseException) -> str:
    """Record "rank R failed: <error>" in the job's store (the first failure wins) and return that line."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not isinstance(error, UserError):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    line = text if text.startswith("rank ") else f"rank {rank} failed: {text}"
    store = _store()
    if store is not None:
        try:
            store.compare_set(FAILED_KEY, "", line)
        except (RuntimeError, ConnectionError, OSError):
            pass
    return line


MEAN_STATS = ("loss", "mse", "l1_norm", "l0", "aux")
"""Step stats that are means over the batch's rows (the rest: "sq_err_sum" a sum, "fired" an any)."""


def batch_share(batch: int, shard: Shard) -> slice:
    """The rows of a batch of `batch` rows that this rank takes in data-parallel training (contiguous, sizes differing
    by at most one)."""
    return slice(batch * shard.rank // shard.world_size, batch * (shard.rank + 1) // shard.world_size)


def data_parallel_reduce(shard: Shard, batch: int) -> Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                                torch.Tensor], tuple[int, torch.Tensor]]:
    """The `reduce` of `Ensemble.step` for data parallelism over the ranks of `shard`, each holding `batch_share`
    of a `batch`-row batch: gradients and mean stats become the row-weighted means over the whole batch (one
    all-reduce of one flat buffer, on the ensemble's device: NCCL on GPUs, gloo on CPUs), "sq_err_sum" its sum,
    "fired" true where any rank's rows fired."""
    def reduce(grads: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], x: torch.Tensor
               ) -> tuple[int, torch.Tensor]:
        weight = x.shape[0] / batch
        means = [n for n in MEAN_STATS if n in stats]
        x64 = x.double()
        parts = [g.mul(weight) for g in grads.values()] + [stats[n].mul(weight) for n in means] + [
            stats["sq_err_sum"], x64.sum(0), x64.square().sum().reshape(1)]
        flat = torch.cat([p.reshape(-1).double() for p in parts])
        fired = stats["fired"].to(torch.uint8)
        _collective(lambda: torch.distributed.all_reduce(flat))
        _collective(lambda: torch.distributed.all_reduce(fired, op=torch.distributed.ReduceOp.MAX))
        at = 0
        for t in [*grads.values(), *(stats[n] for n in means), stats["sq_err_sum"]]:
            t.copy_(flat[at:at + t.numel()].view_as(t))
            at += t.numel()
        total, total_sq = flat[at:at + x.shape[1]], flat[at + x.shape[1]]
        stats["fired"] = fired.bool()
        variance = (total_sq - total.square().sum() / batch).to(x.dtype)
        return batch, variance
    return reduce


def init() -> Shard:
    """This process's `Shard`, joining the process group (gloo; NCCL as well where CUDA is present, for device
    collectives) on the first call when WORLD_SIZE > 1."""
    rank, world, local = env_world()
    if world == 1:
        return Shard()
    dist = torch.distributed
    timeout = datetime.timedelta(seconds=timeout_s())
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        try:
            dist.init_process_group(backend, timeout=timeout)
        except (RuntimeError, ValueError, ConnectionError) as e:
            raise UserError(f"rank {rank}: could not join the other {world - 1} ranks ({str(e).splitlines()[0]}): "
                            "check MASTER_ADDR/MASTER_PORT or the --rdzv_endpoint of torchrun") from None
    group = dist.new_group(backend="gloo", timeout=timeout) if torch.cuda.is_available() else None
    return Shard(rank, world, local, group)


@contextlib.contextmanager
def session() -> Iterator[Shard]:
    """The job's `Shard` for the with-block; an exception on this rank becomes the one-line UserError
    "rank R failed: ..." (published for the other ranks); the process group is left at the end."""
    shard = init()
    if shard.world_size == 1:
        yield shard
        return
    try:
        yield shard
    except PeerFailure as e:
        text = str(e) if str(e).startswith("rank ") else f"rank {shard.rank}: {e}"
        raise UserError(f"{text}; the last checkpoint stays resumable") from None
    except BaseException as e:  # noqa: B902 (KeyboardInterrupt too: the peers must learn why)
        line = publish_failure(shard.rank, e)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise UserError(line) from None
    finally:
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()


def slice_members(state: dict[str, torch.Tensor], members: Sequence[int], n: int) -> dict[str, torch.Tensor]:
    """The entries of ensemble state `state` (training/ensemble_state.py) for global `members`: tensors with a
    leading [n] member axis are indexed (copies), the others (options, switches) kept."""
    idx = torch.tensor(list(members), dtype=torch.long)
    return {name: (t.index_select(0, idx) if _per_member(name, t, n) else t.clone()) for name, t in state.items()}


def join_members(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One ensemble state from the states of consecutive member slices (rank order): member tensors concatenated,
    the rest from the first; "dead.aux_on" is true where any slice's is."""
    first = states[0]
    n_first = int(first["adam.step"].shape[0])
    out = {}
    for name, t in first.items():
        if _per_member(name, t, n_first):
            out[name] = torch.cat([s[name] for s in states])
        else:
            out[name] = t
    if "dead.aux_on" in first:
        out["dead.aux_on"] = torch.tensor(any(bool(s["dead.aux_on"]) for s in states))
    return out


def _per_member(name: str, t: torch.Tensor, n: int) -> bool:
    """Whether state entry `name` has a leading member axis."""
    return not name.startswith("option.") and name != "dead.aux_on" and t.dim() >= 1 and t.shape[0] == n
