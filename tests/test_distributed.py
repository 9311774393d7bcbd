"""Several ranks (torch.distributed, gloo on the CPU, 2 processes launched as torchrun would): the member-sharded
sweep equals the single-process one, resumes at another world size, and a killed rank is a clean error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.multi_hook import write_multi_hook_folder
from bench.top_activations import write_synthetic_folder
from conftest import folder_bytes, small_generate_cfg, sweep_killed_at_chunk
from dist_launch import launch
from training.distributed import join_members, member_slices, slice_members
from training.architectures import get as get_architecture, names as architecture_names
from training.cli import UserError, config_to_dict
from training.generate import PARTS, generate
from training.sweep import SweepConfig, pair_slices, run_sweep, run_sweeps
from training.sweep_files import checkpoint_weights

D = 16


@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory) -> Path:
    """A synthetic one-hook dataset: 4 chunks of 1000 rows of width 16."""
    root = tmp_path_factory.mktemp("dist-data")
    return write_synthetic_folder(root, 4000, D, "synthetic", 50, chunk_size=1000, context_length=20)


def flags(hook_dir: Path, out: Path, **kw) -> dict:
    """Small sweep flags: 3 members (uneven over 2 ranks), resampling every 3 steps, a save after every chunk."""
    base = dict(dataset_dir=str(hook_dir), output_dir=str(out), ratio=2.0, l1_values=[1e-3, 1e-2, 3e-1], batch_size=200,
                log_every=2, device="cpu", center_init="mean", holdout_rows=200, resample_every=3,
                dead_window_tokens=400, save_after_every=True, n_repetitions=2)
    base.update(kw)
    return base


def argv(cfg: dict, script: str = "basic_l1_sweep.py") -> list[str]:
    """The command line of `script` with flags `cfg`."""
    out = [script]
    for k, v in cfg.items():
        if isinstance(v, bool):
            out.append(f"--{k}" if v else f"--no-{k}")
        elif isinstance(v, list):
            out += [f"--{k}", *map(str, v)]
        else:
            out += [f"--{k}", str(v)]
    return out


def checkpoint_state(out: Path) -> dict[str, torch.Tensor]:
    """The training state checkpoint.json names."""
    return load_file(str(checkpoint_weights(out)))


def assert_same_sweep(a: Path, b: Path, world_b: int, rank_members: list[list[int]] | None = None) -> None:
    """Sweep folders `a` (one process) and `b` (`world_b` ranks, which trained `rank_members`, by default
    `member_slices`) hold the same sweep: weights byte for byte, checkpoint tensors equal, metrics.jsonl equal,
    sweep.json equal but for the distribution record."""
    sa, sb = checkpoint_state(a), checkpoint_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), \
        [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    assert (a / "sweep.safetensors").read_bytes() == (b / "sweep.safetensors").read_bytes()
    ja, jb = (json.loads((p / "sweep.json").read_text()) for p in (a, b))
    assert jb.pop("world_size") == world_b and ja.pop("world_size") == 1
    assert jb.pop("rank_members") == (rank_members or member_slices(len(ja["keys"]), world_b))
    assert ja.pop("rank_members") == [list(range(len(ja["keys"])))]
    for j in (ja, jb):
        for name in ("output_dir", "resume"):
            j["config"].pop(name)
    assert ja == jb


def test_member_slices_cover_every_member_once():
    assert member_slices(3, 2) == [[0], [1, 2]]
    assert member_slices(7, 3) == [[0, 1], [2, 3], [4, 5, 6]]
    for n in range(1, 9):
        for w in range(1, n + 1):
            s = member_slices(n, w)
            assert sum(s, []) == list(range(n)) and max(map(len, s)) - min(map(len, s)) <= 1


def test_slice_and_join_members_round_trip():
    state = {"param.decoder": torch.randn(5, 3, 2), "adam.step": torch.arange(5.0), "frozen": torch.zeros(5).bool(),
             "option.adam_betas": torch.tensor([0.9, 0.999]), "dead.aux_on": torch.tensor(False)}
    parts = [slice_members(state, s, 5) for s in member_slices(5, 2)]
    assert parts[0]["param.decoder"].shape == (2, 3, 2) and torch.equal(parts[1]["adam.step"], torch.tensor([2., 3, 4]))
    parts[1]["dead.aux_on"] = torch.tensor(True)
    joined = join_members(parts)
    assert all(torch.equal(joined[k], state[k]) for k in state if k != "dead.aux_on") and bool(joined["dead.aux_on"])


@pytest.mark.parametrize("architecture", architecture_names())
def test_member_sharded_sweep_equals_one_process(hook_dir, tmp_path, architecture):
    extra = dict(architecture=architecture)
    if get_architecture(architecture).sweep_param == "k":
        extra["k_values"] = [2, 4, 8]
    one = run_sweep(SweepConfig(**flags(hook_dir, tmp_path / "one", **extra)))
    ranks = launch(argv(flags(hook_dir, tmp_path / "two", **extra)))
    assert all(r.returncode == 0 for r in ranks), [r.stderr[-2000:] for r in ranks]
    assert f"trained {len(one.keys)} dictionaries" in ranks[0].stdout and ranks[1].stdout == ""   # only rank 0 prints
    assert_same_sweep(tmp_path / "one", tmp_path / "two", 2)


def two_hook_folder(root: Path) -> Path:
    """A dataset folder with hooks "a" and "b" of the same rows (4 chunks of 1000), different activations."""
    return write_multi_hook_folder(root, ["a", "b"], 4000, D, 1000)


def test_pair_slices_spread_hook_member_pairs_evenly():
    assert pair_slices(1, 3, 2) == [member_slices(3, 2)]
    assert pair_slices(2, 3, 2) == [[[0, 1, 2], []], [[], [0, 1, 2]]]
    s = pair_slices(3, 3, 4)
    assert [sum(len(s[h][r]) for h in range(3)) for r in range(4)] == [2, 2, 2, 3]
    assert all(sorted(sum((s[h][r] for r in range(4)), [])) == [0, 1, 2] for h in range(3))


def test_multi_hook_sweep_equals_one_sweep_per_hook(tmp_path):
    root = two_hook_folder(tmp_path / "data")
    for hook in ("a", "b"):
        run_sweep(SweepConfig(**flags(root / hook, tmp_path / "one" / hook)))
    results = run_sweeps(SweepConfig(**flags(root, tmp_path / "multi")))        # one process, both hooks
    assert [r.output_dir.name for r in results] == ["a", "b"]
    ranks = launch(argv(flags(root, tmp_path / "two")))                          # two ranks, one hook each
    assert all(r.returncode == 0 for r in ranks), [r.stderr[-2000:] for r in ranks]
    assert ranks[0].stdout.count("trained 3 dictionaries") == 2
    for hook, members in (("a", [[0, 1, 2], []]), ("b", [[], [0, 1, 2]])):
        assert_same_sweep(tmp_path / "one" / hook, tmp_path / "multi" / hook, 1)
        assert_same_sweep(tmp_path / "one" / hook, tmp_path / "two" / hook, 2, members)


def test_multi_hook_sweep_killed_between_hooks_resumes_on_two_ranks(tmp_path):
    root = two_hook_folder(tmp_path / "data")
    for hook in ("a", "b"):
        run_sweep(SweepConfig(**flags(root / hook, tmp_path / "one" / hook)))
    with sweep_killed_at_chunk(4):          # hook a has trained 2 chunks, hook b 1: their checkpoints differ
        run_sweeps(SweepConfig(**flags(root, tmp_path / "multi")))
    steps = [json.loads((tmp_path / "multi" / h / "checkpoint.json").read_text())["progress"]["chunk_position"]
             for h in ("a", "b")]
    assert steps == [2, 1]
    ranks = launch(argv(flags(root, tmp_path / "multi", resume=True)))
    assert all(r.returncode == 0 for r in ranks), [r.stderr[-2000:] for r in ranks]
    for hook, members in (("a", [[0, 1, 2], []]), ("b", [[], [0, 1, 2]])):
        assert_same_sweep(tmp_path / "one" / hook, tmp_path / "multi" / hook, 2, members)


class FakeWandb:
    """Stands in for the wandb module: records init, define_metric, log and finish."""

    def __init__(self):
        self.inits, self.metrics, self.logs, self.finished = [], {}, [], 0

    def init(self, **kw):
        self.inits.append(kw)
        return self

    def define_metric(self, name, step_metric=None):
        self.metrics[name] = step_metric

    def log(self, data, step=None):
        self.logs.append((data, step))

    def finish(self):
        self.finished += 1


def test_a_multi_hook_run_logs_every_hook_to_one_wandb_run_on_its_own_step_axis(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    root = two_hook_folder(tmp_path / "data")
    run_sweeps(SweepConfig(**flags(root, tmp_path / "out", wandb_project="p", n_repetitions=1)))
    assert len(fake.inits) == 1 and fake.finished == 1
    config = fake.inits[0]["config"]
    assert config["hooks"] == ["a", "b"] and config["dataset_dir"] == str(root)
    assert fake.metrics == {"a/step": None, "a/*": "a/step", "b/step": None, "b/*": "b/step"}
    for hook in ("a", "b"):
        logged = [data for data, step in fake.logs if f"{hook}/step" in data]
        assert all(step is None for data, step in fake.logs)
        lines = [json.loads(ln) for ln in (tmp_path / "out" / hook / "metrics.jsonl").read_text().splitlines()]
        steps = sorted({ln["step"] for ln in lines})
        assert [d[f"{hook}/step"] for d in logged] == steps                  # each hook's own, increasing axis
        last = {ln["l1"]: ln for ln in lines if ln["step"] == steps[-1]}
        for key, line in last.items():
            assert logged[-1][f"{hook}/l1={key}/mse"] == line["mse"]
        assert all(k.startswith(f"{hook}/") for d in logged for k in d)


def test_a_one_hook_run_logs_to_wandb_against_the_training_step(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    root = two_hook_folder(tmp_path / "data")
    run_sweeps(SweepConfig(**flags(root, tmp_path / "out", hooks=["b"], wandb_project="p", n_repetitions=1)))
    assert len(fake.inits) == 1 and fake.finished == 1 and fake.metrics == {}
    assert fake.inits[0]["config"]["dataset_dir"] == str(root / "b")
    lines = [json.loads(ln) for ln in (tmp_path / "out" / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [step for _, step in fake.logs] == sorted({ln["step"] for ln in lines})
    assert all(k.startswith("l1=") for data, _ in fake.logs for k in data)


def test_hooks_flag_picks_hooks(tmp_path):
    root = two_hook_folder(tmp_path / "data")
    results = run_sweeps(SweepConfig(**flags(root, tmp_path / "out", hooks=["b"], n_repetitions=1)))
    assert [r.output_dir for r in results] == [tmp_path / "out" / "b"] and not (tmp_path / "out" / "a").exists()
    with pytest.raises(UserError, match="--hooks c: not in"):
        run_sweeps(SweepConfig(**flags(root, tmp_path / "out", hooks=["c"])))


def test_killed_rank_is_a_clean_error_and_resumes_on_one_process(hook_dir, tmp_path):
    run_sweep(SweepConfig(**flags(hook_dir, tmp_path / "one")))
    cfg = flags(hook_dir, tmp_path / "two")
    ranks = launch(["tests/dist_launch.py", "1", "12", *argv(cfg)])     # rank 1 dies in the third chunk
    assert ranks[1].returncode == -9
    assert ranks[0].returncode == 2, ranks[0].stderr[-2000:]
    lines = ranks[0].stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "rank" in lines[-1] and "resum" in lines[-1], lines[-1]
    assert "Traceback" not in ranks[0].stderr
    assert json.loads((tmp_path / "two" / "checkpoint.json").read_text())["progress"]["step"] == 10
    run_sweep(SweepConfig(**flags(hook_dir, tmp_path / "two", resume=True)))   # world size 1 now
    assert_same_sweep(tmp_path / "one", tmp_path / "two", 1)


def test_raising_rank_is_named_on_every_rank(hook_dir, tmp_path):
    ranks = launch(["tests/dist_launch.py", "1", "-12", *argv(flags(hook_dir, tmp_path / "two"))])
    for r in ranks:
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: rank 1 failed: RuntimeError: injected failure"), last
    run_sweep(SweepConfig(**flags(hook_dir, tmp_path / "two", resume=True)))     # the last checkpoint resumes
    assert json.loads((tmp_path / "two" / "sweep.json").read_text())["finished"]


def test_one_process_checkpoint_resumes_on_two_ranks(hook_dir, tmp_path):
    run_sweep(SweepConfig(**flags(hook_dir, tmp_path / "one")))
    with sweep_killed_at_chunk(3):
        run_sweep(SweepConfig(**flags(hook_dir, tmp_path / "two")))
    ranks = launch(argv(flags(hook_dir, tmp_path / "two", resume=True)))
    assert all(r.returncode == 0 for r in ranks), [r.stderr[-2000:] for r in ranks]
    assert_same_sweep(tmp_path / "one", tmp_path / "two", 2)


def test_refusal_on_rank_0_is_one_line_on_every_rank(hook_dir, tmp_path):
    run_sweep(SweepConfig(**flags(hook_dir, tmp_path / "one", n_repetitions=1, save_after_every=False)))
    ranks = launch(argv(flags(hook_dir, tmp_path / "one", n_repetitions=1, save_after_every=False)))
    for r in ranks:
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "already holds a sweep" in r.stderr


@pytest.mark.parametrize("architecture", ["l1", "topk"])
def test_data_parallel_with_fewer_members_than_ranks_matches_one_process(hook_dir, tmp_path, architecture):
    extra = dict(architecture="topk", k_values=[4]) if architecture == "topk" else dict(l1_values=[1e-2])
    kw = dict(resample_every=0, batch_size=201, **extra)     # odd batch: shares of 100 and 101 rows
    run_sweep(SweepConfig(**flags(hook_dir, tmp_path / "one", **kw)))
    ranks = launch(argv(flags(hook_dir, tmp_path / "two", **kw)))
    assert all(r.returncode == 0 for r in ranks), [r.stderr[-2000:] for r in ranks]
    sa, sb = checkpoint_state(tmp_path / "one"), checkpoint_state(tmp_path / "two")
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].is_floating_point():
            assert torch.allclose(sa[k], sb[k], rtol=DP_RTOL, atol=DP_ATOL), (k, (sa[k] - sb[k]).abs().max())
        else:
            assert torch.equal(sa[k], sb[k]), k
    meta = json.loads((tmp_path / "two" / "sweep.json").read_text())
    assert meta["world_size"] == 2 and meta["rank_members"] == [[0], [0]]
    one = json.loads((tmp_path / "one" / "sweep.json").read_text())["members"][0]
    assert meta["members"][0]["mse"] == pytest.approx(one["mse"], rel=1e-4)


DP_RTOL, DP_ATOL = 1e-4, 1e-6
"""Data parallel against one process: the gradients are the same sums in another order (float32 rounding), after
38 Adam steps; measured: at most 2.2e-8 absolute on parameters of size 0.1-0.4 (L1 and TopK, CPU)."""


def test_more_ranks_than_pairs_of_several_hooks_is_refused(tmp_path):
    root = two_hook_folder(tmp_path / "data")
    ranks = launch(argv(flags(root, tmp_path / "x", l1_values=[1e-2])), world_size=3)
    for r in ranks:
        assert r.returncode == 2 and "3 ranks for 2 members of 2 hooks" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------- Stage 1


def generate_argv(cfg) -> list[str]:
    """generate_test_data.py's command line for GenerateConfig `cfg` (flags left at their defaults omitted)."""
    from training.generate import GenerateConfig
    defaults = config_to_dict(GenerateConfig())
    return argv({k: v for k, v in config_to_dict(cfg).items() if v != defaults[k]}, "generate_test_data.py")


def split_record(folder: Path) -> tuple[dict[str, bytes], dict]:
    """(the folder's files with its manifest parsed, less the command line and the folder's own path; the manifest's
    record of the distributed runs, taken out of it)."""
    files = folder_bytes(folder)
    manifest = json.loads(files.pop("manifest.json"))
    record = manifest.pop("distributed", None)
    manifest.pop("command")
    manifest["config"].pop("dataset_folder")                  # the two folders' own paths
    return {**files, "manifest": manifest}, record


@pytest.fixture(scope="module")
def one_process_dataset(tiny_neox_dir, text_file, tmp_path_factory) -> Path:
    """The dataset folder one process writes with `small_generate_cfg` flags (5 chunks of 300 rows)."""
    folder = tmp_path_factory.mktemp("gen-one") / "data"
    generate(small_generate_cfg(tiny_neox_dir, text_file, folder, n_chunks=5, chunk_size=300), argv=["x"])
    return folder


def test_chunk_split_is_byte_identical_to_one_process(tiny_neox_dir, text_file, tmp_path, one_process_dataset):
    cfg = small_generate_cfg(tiny_neox_dir, text_file, tmp_path / "data", n_chunks=5, chunk_size=300)
    ranks = launch(generate_argv(cfg))
    assert all(r.returncode == 0 for r in ranks), [r.stderr[-2000:] for r in ranks]
    assert "wrote" in ranks[0].stdout and ranks[1].stdout == ""
    files, record = split_record(tmp_path / "data")
    want, none = split_record(one_process_dataset)
    assert none is None and files == want
    assert record == {"runs": [{"world_size": 2, "rank_chunks": [[0, 2, 4], [1, 3]]}]}
    assert not (tmp_path / "data" / PARTS).exists()


def test_chunk_split_of_a_text_that_runs_out_is_byte_identical(tiny_neox_dir, text_file, tmp_path):
    kw = dict(n_chunks=1000, chunk_size=2000, layers=[0], locations=["residual"])     # more than the text holds
    generate(small_generate_cfg(tiny_neox_dir, text_file, tmp_path / "one", **kw), argv=["x"])
    ranks = launch(generate_argv(small_generate_cfg(tiny_neox_dir, text_file, tmp_path / "two", **kw)))
    assert all(r.returncode == 0 for r in ranks), [r.stderr[-2000:] for r in ranks]
    files, record = split_record(tmp_path / "two")
    want, _ = split_record(tmp_path / "one")
    assert files == want and files["manifest"]["exhausted"] and files["manifest"]["chunks"][-1]["partial"]
    assert record["runs"][0]["world_size"] == 2


def test_chunk_split_killed_rank_resumes_missing_chunks_only(tiny_neox_dir, text_file, tmp_path,
                                                             one_process_dataset):
    cfg = small_generate_cfg(tiny_neox_dir, text_file, tmp_path / "data", n_chunks=5, chunk_size=300)
    ranks = launch(["tests/dist_launch.py", "1", "chunk:1", *generate_argv(cfg)])   # rank 1 dies after chunk 1
    assert ranks[1].returncode == -9 and ranks[0].returncode == 2, ranks[0].stderr[-2000:]
    last = ranks[0].stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 0: another rank stopped") and "Traceback" not in ranks[0].stderr
    parts = sorted(p.name for p in (tmp_path / "data" / PARTS).glob("*.json"))
    assert "1.json" in parts and "3.json" not in parts
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("1.safetensors")}
    generate(cfg, argv=["x"])                                                       # one process finishes it
    assert {p: p.stat().st_mtime_ns for p in before} == before                      # chunk 1 was not redone
    files, record = split_record(tmp_path / "data")
    want, _ = split_record(one_process_dataset)
    assert files == want and record["runs"][-1]["world_size"] == 1
