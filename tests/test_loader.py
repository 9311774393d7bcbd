"""Stage 2's input pipeline: checksums once per run, pinned double-buffered staging, unchanged sweep results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import training.chunks as chunks_mod
import training.sweep as sweep_mod
import training.sweep_data as sweep_data_mod
from bench.top_activations import write_synthetic_folder
from conftest import sweep_killed_at_chunk
from training.chunks import open_hook
from training.cli import UserError
from training.sweep import SweepConfig, run_sweep
from training.sweep_files import checkpoint_weights


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory) -> Path:
    """A synthetic one-hook folder: 4 chunks of 1000 rows, d 16."""
    return write_synthetic_folder(tmp_path_factory.mktemp("loader") / "ds", 4000, 16, model="none", vocab_size=5,
                                  chunk_size=1000, hook="h")


def sweep_cfg(hook_dir: Path, out: Path, **kw) -> SweepConfig:
    """A small, fast sweep over `hook_dir`."""
    base = dict(dataset_dir=str(hook_dir), output_dir=str(out), ratio=2, l1_values=[1e-3, 1e-2], batch_size=200,
                log_every=3, device="cpu", center_init="mean", holdout_rows=100, n_repetitions=3)
    base.update(kw)
    return SweepConfig(**base)


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The file names hashed by `HookData.verify`, in order."""
    seen: list[str] = []
    real = chunks_mod.file_sha256

    def counting(path, *a, **k):
        seen.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(chunks_mod, "file_sha256", counting)
    return seen


def test_each_chunk_is_hashed_once_per_run(hook_dir, tmp_path, hashed):
    run_sweep(sweep_cfg(hook_dir, tmp_path / "o"))
    assert sorted(hashed) == ["0.safetensors", "1.safetensors", "2.safetensors", "3.safetensors"]


def test_a_resumed_run_verifies_again_once(hook_dir, tmp_path, hashed, monkeypatch):
    with sweep_killed_at_chunk(6):  # killed in the second repetition
        run_sweep(sweep_cfg(hook_dir, tmp_path / "o", save_after_every=True))
    assert len(hashed) == 4
    hashed.clear()
    run_sweep(sweep_cfg(hook_dir, tmp_path / "o", save_after_every=True, resume=True))
    assert sorted(hashed) == ["0.safetensors", "1.safetensors", "2.safetensors", "3.safetensors"]


def test_verification_still_catches_a_corrupt_chunk_each_run(hook_dir, tmp_path):
    import shutil
    root = tmp_path / "c"
    shutil.copytree(hook_dir.parent, root)
    data = open_hook(root / "h")
    data.load(2, verify=True)
    path = root / "h" / "2.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x55
    path.write_bytes(bytes(raw))
    data.load(2, verify=True)  # already verified by this object: not hashed again
    with pytest.raises(UserError, match=r"2\.safetensors does not match the checksum"):
        open_hook(root / "h").load(2, verify=True)  # a new run (a new HookData) checks it again


# ------------------------------------------------------------------------------------- pinned double buffers

class DeferredDevice:
    """A stand-in for a CUDA stream on the CPU: `copy` queues a copy of a host view, which runs only when a fence
    recorded after it is waited on (or at `finish`), as a GPU runs queued non-blocking copies later."""

    def __init__(self):
        import threading
        self.queue: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        self.done = 0
        self.lock = threading.Lock()
        self.log: list[tuple[str, int]] = []

    def copy(self, view: torch.Tensor) -> list[torch.Tensor]:
        """Queue a copy of `view`; the returned list holds the copy once it has run."""
        out: list[torch.Tensor] = []
        with self.lock:
            self.queue.append((view, out))
        return out

    def run_until(self, mark: int) -> None:
        """Run the queued copies up to position `mark`."""
        with self.lock:
            while self.done < mark:
                view, out = self.queue[self.done]
                out.append(view.clone())
                self.done += 1

    def finish(self) -> None:
        """Run every queued copy."""
        self.run_until(len(self.queue))

    def fence(self):
        """A Fence on this queue."""
        device = self

        class DeferredFence:
            def record(self) -> None:
                self.mark = len(device.queue)
                device.log.append(("record", self.mark))

            def wait(self) -> None:
                device.log.append(("wait", self.mark))
                device.run_until(self.mark)
        return DeferredFence()


def staged_batches(hook_dir: Path, staging, device: DeferredDevice | None, reps: int = 2, batch: int = 300):
    """Every batch a sweep would copy to the device over `reps` repetitions (held-out tail 100 rows)."""
    from training.sweep import iter_chunks
    data = open_hook(hook_dir)
    copies = []
    for rep in range(reps):
        for _, chunk in iter_chunks(data, 3, rep, 0, 100, staging):
            for b in range(len(chunk) // batch):
                view = chunk[b * batch:(b + 1) * batch]
                copies.append(device.copy(view) if device is not None else [view.clone()])
    if device is not None:
        device.finish()
    return [c[0] for c in copies]


def test_staged_chunks_equal_the_plain_ones_even_when_copies_land_late(hook_dir):
    from training.staging import PinnedStaging
    plain = staged_batches(hook_dir, None, None)
    device = DeferredDevice()
    staging = PinnedStaging(pin=False, fence=device.fence)
    staged = staged_batches(hook_dir, staging, device)
    assert len(staged) == len(plain) == 2 * (3 + 3 + 3 + 3) and all(torch.equal(a, b) for a, b in zip(plain, staged))
    assert sum(1 for kind, _ in device.log if kind == "wait") == 2 * 4 - 2  # every refill of a used buffer waited
    assert sum(b is not None for b in staging.buffers) == 2


def test_without_the_fence_late_copies_would_read_a_refilled_buffer(hook_dir):
    """The check above can fail: a staging whose gather does not wait hands the device overwritten rows."""
    from training.staging import PinnedStaging

    class NoWait(PinnedStaging):
        def gather(self, slot, acts, perm):
            self.fences[slot] = None
            return super().gather(slot, acts, perm)

    device = DeferredDevice()
    plain = staged_batches(hook_dir, None, None)
    staged = staged_batches(hook_dir, NoWait(pin=False, fence=device.fence), device)
    assert not all(torch.equal(a, b) for a, b in zip(plain, staged))


def test_cpu_runs_unstaged():
    from training.staging import staging_for
    assert staging_for(torch.device("cpu")) is None


def weights(out: Path) -> dict[str, torch.Tensor]:
    """The sweep's saved tensors, weights and checkpoint."""
    return {**load_file(str(out / "sweep.safetensors")),
            **{"ckpt." + k: v for k, v in load_file(str(checkpoint_weights(out))).items()}}


def test_staged_sweep_has_bit_identical_weights(hook_dir, tmp_path, monkeypatch):
    from training.staging import PinnedStaging
    plain = run_sweep(sweep_cfg(hook_dir, tmp_path / "plain"))
    monkeypatch.setattr(sweep_mod, "staging_for", lambda device: PinnedStaging(pin=False, fence=DeferredDevice().fence))
    staged = run_sweep(sweep_cfg(hook_dir, tmp_path / "staged"))
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "staged")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert plain.metrics == staged.metrics
    assert (tmp_path / "plain" / "metrics.jsonl").read_text() == (tmp_path / "staged" / "metrics.jsonl").read_text()


def test_checksums_of_upcoming_chunks_are_checked_ahead_in_parallel(hook_dir, monkeypatch):
    import threading
    from training.sweep import iter_chunks
    monkeypatch.setattr(sweep_data_mod, "verify_threads", lambda: 2)
    real, threads = chunks_mod.file_sha256, []

    def recording(path, *a, **k):
        threads.append(threading.current_thread().name.split("_")[0])
        return real(path, *a, **k)

    monkeypatch.setattr(chunks_mod, "file_sha256", recording)
    data = open_hook(hook_dir)
    for rep in range(2):
        assert [pos for pos, _ in iter_chunks(data, 0, rep, 0)] == [0, 1, 2, 3]
    assert threads == ["verify"] * 4 and data.verified == {0, 1, 2, 3}


def test_a_chunk_is_hashed_while_its_rows_are_gathered(hook_dir, monkeypatch):
    """Each chunk's hash waits until its own gather has begun: it would never finish if the gather waited for it."""
    import threading
    from training.sweep import iter_chunks
    real_hash, real_mmap = chunks_mod.file_sha256, chunks_mod.mmap_tensors
    gathering = {name: threading.Event() for name in ("0.safetensors", "1.safetensors", "2.safetensors",
                                                       "3.safetensors")}

    def mapped(path, *a, **k):
        gathering[Path(path).name].set()
        return real_mmap(path, *a, **k)

    def hash_after_gather(path, *a, **k):
        assert gathering[Path(path).name].wait(timeout=10), "the gather waited for the hash"
        return real_hash(path, *a, **k)

    monkeypatch.setattr(chunks_mod, "mmap_tensors", mapped)
    monkeypatch.setattr(chunks_mod, "file_sha256", hash_after_gather)
    assert [pos for pos, _ in iter_chunks(open_hook(hook_dir), 0, 0, 0)] == [0, 1, 2, 3]


def test_a_corrupt_chunk_is_reported_as_such_and_never_handed_over(hook_dir, tmp_path):
    """A chunk whose bytes were damaged into a NaN fails its checksum: the run says so (not "NaN activations"), and
    its rows never reach the caller."""
    import shutil
    from training.sweep import iter_chunks
    root = tmp_path / "c"
    shutil.copytree(hook_dir.parent, root)
    data = open_hook(root / "h")
    path = root / "h" / "2.safetensors"
    raw = bytearray(path.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    offset = 8 + header + json.loads(raw[8:8 + header])["activations"]["data_offsets"][0]  # first activation
    nan = torch.tensor([float("nan")], dtype=data.load(2)["activations"].dtype).view(torch.uint8).numpy().tobytes()
    raw[offset:offset + len(nan)] = nan
    path.write_bytes(bytes(raw))
    assert not torch.isfinite(data.load(2)["activations"][0, 0])
    handed = []
    with pytest.raises(UserError, match=r"2\.safetensors does not match the checksum"):
        for pos, chunk in iter_chunks(open_hook(root / "h"), 0, 0, 0):
            handed.append(bool(torch.isfinite(chunk).all()))
    assert all(handed) and len(handed) < 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned staging)")
def test_cuda_staged_sweep_has_bit_identical_weights(hook_dir, tmp_path, monkeypatch):
    from training.staging import PinnedStaging
    staged = run_sweep(sweep_cfg(hook_dir, tmp_path / "staged", device="cuda"))
    assert isinstance(sweep_mod.staging_for(torch.device("cuda")), PinnedStaging)
    monkeypatch.setattr(sweep_mod, "staging_for", lambda device: None)
    plain = run_sweep(sweep_cfg(hook_dir, tmp_path / "plain", device="cuda"))
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "staged")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and plain.metrics == staged.metrics
