"""Bring your own activations: .npy/.safetensors round trips, chunking and shuffling, precision, one-line errors,
a sweep trained on an imported folder, and the tools that need token ids refusing it in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from training.activation_import import ImportConfig, run_import, write_activation_folder
from training.chunks import MANIFEST, mmap_tensors, open_hook
from training.cli import UserError, run_cli

D = 16


def rows_of(hook_dir: Path) -> np.ndarray:
    """Every stored row, chunk after chunk, as float32 [n, d] (checksums verified)."""
    data = open_hook(hook_dir)
    return np.concatenate([data.load(i, verify=True)["activations"].float().numpy() for i in range(len(data.chunks))])


def sorted_rows(x: np.ndarray) -> np.ndarray:
    """The rows of x [n, d] in lexicographic order (so that two multisets of rows compare equal)."""
    return x[np.lexsort(x.T[::-1])]


def random_rows(n: int, d: int = D, seed: int = 0, dtype: type = np.float32) -> np.ndarray:
    """n random rows [n, d]."""
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


@pytest.fixture
def two_npy(tmp_path: Path) -> tuple[list[Path], np.ndarray]:
    """Two .npy files (1000 and 537 rows of width 16) and their rows concatenated."""
    a, b = random_rows(1000, seed=1), random_rows(537, seed=2)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    return [tmp_path / "a.npy", tmp_path / "b.npy"], np.concatenate([a, b])


def do_import(inputs: list, out: Path, **kw) -> Path:
    """Import through the CLI's config; returns the hook folder."""
    return run_import(ImportConfig(input=[str(p) for p in inputs], out=str(out), **kw), argv=["x"]).hook_dir


# ----------------------------------------------------------------------------------------- round trips


def test_npy_round_trip_chunks_manifest_and_checksums(two_npy, tmp_path):
    files, x = two_npy
    hook_dir = do_import(files, tmp_path / "ds", chunk_size=400)
    assert hook_dir == tmp_path / "ds" / "imported"
    data = open_hook(tmp_path / "ds")
    assert [c.rows for c in data.chunks] == [400, 400, 400, 337] and data.d == D and data.n_rows == 1537
    stored = rows_of(hook_dir)
    assert np.array_equal(sorted_rows(stored), sorted_rows(x))       # the same rows, exactly
    assert not np.array_equal(stored, x)                               # shuffled
    first = {r.tobytes() for r in stored[:400]}
    assert any(r.tobytes() in first for r in x[1000:]) and any(r.tobytes() in first for r in x[:1000])
    man = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    assert man["has_tokens"] is False and man["kind"] == "imported" and not data.has_tokens
    assert man["config"]["model"] == "imported" and man["model"]["name"] == "imported"
    assert man["config"]["chunk_size"] == 400 and man["config"]["input"] == [str(f) for f in files]
    assert [(i["name"], i["rows"], i["d"], i["bytes"]) for i in man["source"]["inputs"]] == \
        [(str(f), n, D, f.stat().st_size) for f, n in zip(files, (1000, 537))]
    assert [c["partial"] for c in man["hooks"]["imported"]["chunks"]] == [False, False, False, True]
    assert [c["partial"] for c in man["chunks"]] == [False, False, False, True] and man["total_tokens"] == 1537
    assert man["finished"] and not (tmp_path / "ds" / "contexts").exists()
    np.testing.assert_allclose(man["hooks"]["imported"]["mean"], x.astype(np.float64).mean(0), atol=1e-6)
    assert man["hooks"]["imported"]["mean_norm"] == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-5)
    tensors, info = mmap_tensors(hook_dir / "3.safetensors")
    assert set(tensors) == {"activations"} and info == {"chunk": 3, "rows": 337, "partial": True}
    assert mmap_tensors(hook_dir / "0.safetensors")[1]["partial"] is False
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "b.npy", "ds"]  # no temporary folder left


def test_same_seed_same_bytes_other_seed_other_order(two_npy, tmp_path):
    files, _ = two_npy
    a, b, c = (do_import(files, tmp_path / n, chunk_size=500, seed=s) for n, s in (("a", 3), ("b", 3), ("c", 4)))
    for i in range(4):
        assert (a / f"{i}.safetensors").read_bytes() == (b / f"{i}.safetensors").read_bytes()
    assert (a / "0.safetensors").read_bytes() != (c / "0.safetensors").read_bytes()
    hooks = [json.loads((h.parent / MANIFEST).read_text())["hooks"] for h in (a, b)]
    assert hooks[0] == hooks[1]


def test_safetensors_inputs_pick_the_one_float_matrix_or_the_named_tensor(tmp_path):
    x1, x2, x3 = random_rows(300, seed=3), random_rows(200, seed=4), random_rows(100, seed=5)
    save_file({"acts": torch.from_numpy(x1)}, str(tmp_path / "one.safetensors"))
    save_file({"activations": torch.from_numpy(x2), "token_ids": torch.arange(200)},
              str(tmp_path / "chunk.safetensors"))
    save_file({"resid": torch.from_numpy(x3), "other": torch.zeros(100, D)}, str(tmp_path / "two.safetensors"))
    hook_dir = do_import([tmp_path / "one.safetensors", tmp_path / "chunk.safetensors"], tmp_path / "ds",
                         chunk_size=128)
    assert np.array_equal(sorted_rows(rows_of(hook_dir)), sorted_rows(np.concatenate([x1, x2])))
    man = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    assert [i["tensor"] for i in man["source"]["inputs"]] == ["acts", "activations"]
    with pytest.raises(UserError, match=r"two.safetensors holds several 2-D float tensors \(other, resid\): "
                                        "name one with --tensor NAME"):
        do_import([tmp_path / "two.safetensors"], tmp_path / "ds2")
    hook_dir = do_import([tmp_path / "two.safetensors"], tmp_path / "ds2", tensor="resid", chunk_size=64)
    assert np.array_equal(sorted_rows(rows_of(hook_dir)), sorted_rows(x3))
    with pytest.raises(UserError, match="has no tensor 'nope'; it has: other, resid"):
        do_import([tmp_path / "two.safetensors"], tmp_path / "ds3", tensor="nope")


def test_several_files_and_a_folder_in_name_order(tmp_path):
    folder = tmp_path / "acts"
    folder.mkdir()
    parts = [random_rows(n, seed=10 + n) for n in (50, 70, 30)]
    np.save(folder / "part_1.npy", parts[0])
    save_file({"x": torch.from_numpy(parts[1])}, str(folder / "part_2.safetensors"))
    np.save(folder / "part_0.npy", parts[2])
    (folder / "notes.txt").write_text("ignored")
    extra = random_rows(20, seed=99)
    np.save(tmp_path / "extra.npy", extra)
    hook_dir = do_import([folder, tmp_path / "extra.npy"], tmp_path / "ds", chunk_size=64,
                         hook="blocks.3.hook_resid_post")
    assert hook_dir.name == "blocks.3.hook_resid_post"
    man = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    assert [Path(i["name"]).name for i in man["source"]["inputs"]] == \
        ["part_0.npy", "part_1.npy", "part_2.safetensors", "extra.npy"]
    assert [c["rows"] for c in man["hooks"]["blocks.3.hook_resid_post"]["chunks"]] == [64, 64, 42]
    assert np.array_equal(sorted_rows(rows_of(hook_dir)), sorted_rows(np.concatenate(parts + [extra])))


@pytest.mark.parametrize("precision, dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16),
                                              ("float32", torch.float32)])
def test_storage_precision(two_npy, tmp_path, precision, dtype):
    files, x = two_npy
    hook_dir = do_import(files, tmp_path / "ds", chunk_size=1000, precision=precision)
    chunk = open_hook(hook_dir).load(0, verify=True)["activations"]
    assert chunk.dtype == dtype and chunk.shape == (1000, D)
    expected = torch.from_numpy(x).to(dtype).float().numpy()
    assert np.array_equal(sorted_rows(rows_of(hook_dir)), sorted_rows(expected))


def test_write_activation_folder_takes_arrays_tensors_and_paths(tmp_path):
    a = random_rows(100, seed=6)
    b = torch.from_numpy(random_rows(60, seed=7)).to(torch.bfloat16)
    c = random_rows(40, seed=8, dtype=np.float64)
    np.save(tmp_path / "c.npy", c)
    hook_dir = write_activation_folder([a, b, tmp_path / "c.npy"], tmp_path / "ds", chunk_size=64, seed=1,
                                       hook="resid", source={"model": "pythia-70m", "note": "benchmark"})
    assert hook_dir == tmp_path / "ds" / "resid"
    expected = np.concatenate([a, b.float().numpy(), c.astype(np.float32)])
    assert np.array_equal(sorted_rows(rows_of(hook_dir)), sorted_rows(expected))
    man = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    assert man["source"]["model"] == "pythia-70m" and man["source"]["note"] == "benchmark"
    assert [i["dtype"] for i in man["source"]["inputs"]] == ["float32", "bfloat16", "float64"]
    assert [i["name"] for i in man["source"]["inputs"]][:2] == ["<array 0>", "<array 1>"]
    with pytest.raises(UserError, match="is not empty: pass --overwrite"):
        write_activation_folder([a], tmp_path / "ds")
    write_activation_folder([a], tmp_path / "ds", overwrite=True)
    assert not (tmp_path / "ds" / "resid").exists() and open_hook(tmp_path / "ds").n_rows == 100


def test_overwrite_replaces_only_a_dataset(two_npy, tmp_path):
    files, x = two_npy
    out = tmp_path / "ds"
    do_import(files, out, chunk_size=400, hook="old")
    (out / "README.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty: pass --overwrite"):
        do_import(files[:1], out)
    hook_dir = do_import(files[:1], out, overwrite=True, chunk_size=300)
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "imported", MANIFEST]
    assert np.array_equal(sorted_rows(rows_of(hook_dir)), sorted_rows(x[:1000]))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no dataset .*--overwrite only replaces a dataset folder"):
        do_import(files, tmp_path / "other", overwrite=True)
    (tmp_path / "empty").mkdir()
    assert do_import(files, tmp_path / "empty").exists()


# ----------------------------------------------------------------------------------------- errors


def bad_input_cases(tmp_path: Path) -> list[tuple[list, dict, str]]:
    """(inputs, extra config, message) of every refused input."""
    good = tmp_path / "good.npy"
    np.save(good, random_rows(10))
    cases: list[tuple[list, dict, str]] = []

    def npy(name: str, arr: np.ndarray) -> Path:
        np.save(tmp_path / name, arr, allow_pickle=True)
        return tmp_path / name

    cases.append(([good, npy("narrow.npy", random_rows(10, d=8))], {},
                  r"narrow.npy is 8 wide but .*good.npy is 16 wide: every input must have the same width"))
    cases.append(([npy("flat.npy", np.zeros(10, np.float32))], {},
                  r"flat.npy holds a 1-D array of shape \[10\]: activations must be 2-D \[rows, width\]"))
    cases.append(([npy("cube.npy", np.zeros((2, 3, 4), np.float32))], {}, r"holds a 3-D array of shape \[2, 3, 4\]"))
    nan = random_rows(30)
    nan[17, 3] = np.nan
    cases.append(([good, npy("nan.npy", nan)], {}, r"nan.npy row 17 holds a NaN or infinite value: activations must "
                                                     "be finite"))
    inf = random_rows(30)
    inf[5, 0] = -np.inf
    cases.append(([npy("inf.npy", inf)], {"chunk_size": 7}, r"inf.npy row 5 holds a NaN or infinite value"))
    cases.append(([npy("empty.npy", np.zeros((0, D), np.float32))], {}, r"empty.npy holds no rows \(shape \[0, 16\]\)"))
    cases.append(([npy("ints.npy", np.zeros((4, D), np.int64))], {}, "ints.npy holds int64 values: activations must be "
                                                                     "float16, bfloat16, float32 or float64"))
    cases.append(([npy("objects.npy", np.array([{"a": 1}], dtype=object))], {}, "objects.npy is not a readable .npy"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    cases.append(([tmp_path / "junk.safetensors"], {}, "junk.safetensors is not a readable .safetensors file"))
    save_file({"ids": torch.arange(5)}, str(tmp_path / "ids.safetensors"))
    cases.append(([tmp_path / "ids.safetensors"], {}, r"ids.safetensors tensor 'ids' holds a 1-D array"))
    cases.append(([tmp_path / "missing.npy"], {}, "input .*missing.npy does not exist"))
    (tmp_path / "acts.csv").write_text("1,2\n")
    cases.append(([tmp_path / "acts.csv"], {}, "acts.csv is neither .npy nor .safetensors"))
    (tmp_path / "nothing").mkdir()
    cases.append(([tmp_path / "nothing"], {}, "folder .*nothing holds no .npy or .safetensors file"))
    cases.append(([], {}, "no input: pass --input"))
    cases.append(([good, good], {}, "good.npy is given twice"))
    cases.append(([good], {"chunk_size": 0}, "--chunk_size must be at least 1"))
    cases.append(([good], {"hook": "a/b"}, "--hook 'a/b' cannot name the chunk folder"))
    cases.append(([good], {"out": None}, "no output folder: pass --out DIR"))
    cases.append(([npy("huge.npy", np.full((3, D), 1e6, np.float32))], {"precision": "float16"},
                  r"overflow float16 \(largest \|x\| = 1e\+06\): use --precision float32 or bfloat16"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    cases.append(([good], {"out": str(tmp_path / "full")}, "--out .*full is not empty: pass --overwrite"))
    return cases


def test_bad_inputs_are_one_line_errors_and_leave_nothing(tmp_path):
    inputs_dir = tmp_path / "in"
    inputs_dir.mkdir()
    for inputs, extra, message in bad_input_cases(inputs_dir):
        cfg = ImportConfig(input=[str(p) for p in inputs], **{"out": str(tmp_path / "ds"), **extra})
        with pytest.raises(UserError, match=message) as info:
            run_import(cfg, argv=["x"])
        assert "\n" not in str(info.value), message
        assert not (tmp_path / "ds").exists(), message
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in"], message  # no temporary folder either


def test_cli_prints_summary_or_one_line_error(two_npy, tmp_path, capsys):
    from import_activations import main
    files, _ = two_npy
    run_cli(main, "", ImportConfig, ["--input", *map(str, files), "--out", str(tmp_path / "ds"), "--chunk_size", "600"])
    out = capsys.readouterr().out
    assert "imported 1,537 rows of width 16 from 2 input(s) into 3 chunk(s)" in out and "rows/s" in out
    assert "basic_l1_sweep.py --dataset_dir" in out
    with pytest.raises(SystemExit) as info:
        run_cli(main, "", ImportConfig, ["--input", *map(str, files), "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: --out")


# ----------------------------------------------------------------------------------------- the other tools


def sparse_rows(n: int, d: int = D, n_features: int = 24, seed: int = 0) -> np.ndarray:
    """n rows [n, d], each a sum of 2 of `n_features` random unit directions with positive weights."""
    g = np.random.default_rng(seed)
    dirs = g.standard_normal((n_features, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    idx = np.stack([g.choice(n_features, 2, replace=False) for _ in range(n)])
    w = g.uniform(0.5, 2.0, (n, 2))
    return np.einsum("nk,nkd->nd", w, dirs[idx]).astype(np.float32)


@pytest.fixture(scope="module")
def imported_sweep(tmp_path_factory) -> tuple[Path, Path]:
    """(hook folder, sweep folder): sequence-ordered sparse rows imported in two files, and a one-member L1 sweep."""
    root = tmp_path_factory.mktemp("imported")
    x = sparse_rows(3000)
    np.save(root / "first.npy", x[:2000])
    np.save(root / "second.npy", x[2000:])
    hook_dir = do_import([root / "first.npy", root / "second.npy"], root / "ds", chunk_size=1000)
    from training.sweep import SweepConfig, run_sweep
    result = run_sweep(SweepConfig(dataset_dir=str(hook_dir), output_dir=str(root / "sweep"), ratio=2,
                                   l1_values=[1e-3], batch_size=100, n_repetitions=3, adam_lr=1e-2, device="cpu",
                                   center_init="mean", log_every=10, resample_every=0))
    assert result.metrics[0]["explained_variance"] > 0.5
    return hook_dir, root / "sweep"


def test_sweep_trains_on_an_imported_folder(imported_sweep):
    _, sweep = imported_sweep
    meta = json.loads((sweep / "sweep.json").read_text())
    assert meta["finished"] and meta["hook"] == "imported" and meta["source_manifest"]["has_tokens"] is False
    from training import load_sweep
    sae = load_sweep(sweep)[1e-3]
    x = torch.from_numpy(sparse_rows(500, seed=0))
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    assert 1 - (x_hat - x).square().sum() / (x - x.mean(0)).square().sum() > 0.5


def one_line_error(call, message: str) -> None:
    """`call()` raises a one-line UserError matching `message`."""
    with pytest.raises(UserError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_tools_that_need_tokens_refuse_in_one_line(imported_sweep, tmp_path, capsys):
    from training.dashboards import DashboardConfig, make_dashboards
    from training.evaluate import EvaluateConfig, evaluate_sweep
    from training.steering import SteerConfig, run_steer
    from training.top_activations import TopActivationsConfig, gather
    hook_dir, sweep = imported_sweep
    needs = "holds imported activations without token ids: gather_high_activations.py needs a folder written by " \
            "generate_test_data.py, or --model and --dataset"
    one_line_error(lambda: gather(TopActivationsConfig(sweep=str(sweep), device="cpu")), needs)
    one_line_error(lambda: gather(TopActivationsConfig(neurons=True, dataset_dir=str(hook_dir), device="cpu")), needs)
    one_line_error(lambda: open_hook(hook_dir).context(0, 0), "holds imported activations without token ids")
    one_line_error(lambda: evaluate_sweep(EvaluateConfig(sweep=str(sweep), device="cpu")),
                   r"trained on imported activations .* record no model or text: pass --model, --dataset, "
                   "--context_length")
    one_line_error(lambda: evaluate_sweep(EvaluateConfig(sweep=str(sweep), device="cpu", model="m", dataset="d")),
                   "pass --context_length")
    one_line_error(lambda: run_steer(SteerConfig(sweep=str(sweep), feature=0, prompt="hi", device="cpu")),
                   r"trained on imported activations, which record no model: pass --model")
    one_line_error(lambda: make_dashboards(DashboardConfig(sweep=str(sweep), device="cpu")),
                   "features.json: the sweep was trained on imported activations without token ids, so gather its "
                   "features with gather_high_activations.py --model and --dataset")
    from gather_high_activations import main as gather_main
    with pytest.raises(SystemExit) as info:
        run_cli(gather_main, "", TopActivationsConfig, ["--sweep", str(sweep), "--device", "cpu"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "without token ids" in err


def test_generate_refuses_to_resume_an_imported_folder(two_npy, tiny_neox_dir, tmp_path):
    from training.generate import GenerateConfig, generate
    files, _ = two_npy
    out = tmp_path / "ds"
    do_import(files, out)
    cfg = GenerateConfig(model=str(tiny_neox_dir), dataset_folder=str(out), n_chunks=1, chunk_size=64,
                         context_length=16, device="cpu")
    one_line_error(lambda: generate(cfg, argv=["x"]),
                   "holds imported activations .*generate_test_data.py cannot resume: pass --overwrite")
    cfg.overwrite = True
    generate(cfg, argv=["x"])
    man = json.loads((out / MANIFEST).read_text())
    assert man["has_tokens"] is True and not (out / "imported").exists()


def test_imported_stage1_chunks_evaluate_and_steer_with_a_model(tiny_neox_dir, tmp_path):
    """Stage 1 chunks imported as plain activations (their token columns ignored) under the real hook name:
    evaluate_sweep.py, steer.py, gather_high_activations.py and make_dashboards.py run once given the model (and
    text) the import does not record."""
    from conftest import fixture_documents
    from training.evaluate import EvaluateConfig, evaluate_sweep
    from training.generate import GenerateConfig, generate
    from training.dashboards import DashboardConfig, make_dashboards
    from training.steering import SteerConfig, run_steer
    from training.sweep import SweepConfig, run_sweep
    from training.top_activations import TopActivationsConfig, gather
    hook = "blocks.1.hook_resid_post"
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(fixture_documents(300)))
    generate(GenerateConfig(model=str(tiny_neox_dir), dataset=str(text), dataset_folder=str(tmp_path / "s1"),
                            layers=[1], n_chunks=2, chunk_size=600, context_length=32, device="cpu"), argv=["x"])
    hook_dir = write_activation_folder(sorted((tmp_path / "s1" / hook).glob("*.safetensors")), tmp_path / "ds",
                                       chunk_size=500, hook=hook, source={"model": str(tiny_neox_dir)})
    assert [c.rows for c in open_hook(hook_dir).chunks] == [500, 500, 200]
    run_sweep(SweepConfig(dataset_dir=str(hook_dir), output_dir=str(tmp_path / "sweep"), ratio=2, l1_values=[1e-2],
                          batch_size=100, device="cpu", center_init="mean", log_every=10))
    result = evaluate_sweep(EvaluateConfig(sweep=str(tmp_path / "sweep"), model=str(tiny_neox_dir), dataset=str(text),
                                           context_length=32, n_tokens=200, device="cpu", with_error=False))
    ev = result.report["evaluated"]
    assert ev["hook"] == hook and ev["n_tokens"] >= 200 and "imported" in ev["held_out"]
    assert math_finite(result.report["members"][0]["ce_loss_score"])
    steered = run_steer(SteerConfig(sweep=str(tmp_path / "sweep"), model=str(tiny_neox_dir), feature=0,
                                    strength=[0.0], prompt="The cat", max_new_tokens=3, device="cpu", width=80))
    assert steered.hook == hook and steered.runs
    gathered = gather(TopActivationsConfig(sweep=str(tmp_path / "sweep"), model=str(tiny_neox_dir), dataset=str(text),
                                           context_length=32, n_tokens=300, top_k=3, device="cpu"))
    assert gathered.n_tokens >= 300
    site = make_dashboards(DashboardConfig(sweep=str(tmp_path / "sweep"), feature_ids=[0, 1], device="cpu"))
    assert site.index.exists()


def math_finite(v) -> bool:
    """Whether v is a finite number."""
    return isinstance(v, (int, float)) and np.isfinite(v)


def test_steer_names_the_import_hook_the_model_lacks(imported_sweep, tiny_neox_dir):
    from training.steering import SteerConfig, run_steer
    _, sweep = imported_sweep
    one_line_error(lambda: run_steer(SteerConfig(sweep=str(sweep), model=str(tiny_neox_dir), feature=0, prompt="hi",
                                                 device="cpu")),
                   "activations imported as hook 'imported', which this model does not have: import them with --hook")
