"""Shared test fixtures: tiny random HF models (GPT-NeoX, GPT-2) with a tokenizer, and small local text files.

All are session-scoped (built once per test run), offline and CPU-only. A model fixture returns the
folder it was saved to, to be loaded like a hub name:
`TransformerBridge.boot_transformers(str(path), device="cpu")`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Tests never reach a hub: set before huggingface_hub / datasets are imported (they read these once).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TINY_ARCHS = ("gpt_neox", "gpt2")
"""Architectures `make_tiny_hf_model` can build."""


def fixture_documents(n: int = 120) -> list[str]:
    """`n` short, varied, deterministic English documents (several sentences each)."""
    nouns = ["cat", "parser", "river", "socket", "garden", "thread", "lamp", "queue", "forest", "token"]
    verbs = ["reads", "splits", "follows", "closes", "watches", "returns", "joins", "opens"]
    adjs = ["quiet", "small", "busy", "green", "empty", "strange", "old", "fast"]
    docs = []
    for i in range(n):
        sentences = []
        for j in range(2 + i % 4):
            k = i * 7 + j * 3
            sentences.append(f"The {adjs[k % len(adjs)]} {nouns[k % len(nouns)]} {verbs[(k // 2) % len(verbs)]} "
                             f"the {nouns[(k + 3) % len(nouns)]} number {i + j}.")
        docs.append(" ".join(sentences))
    return docs


def make_tiny_tokenizer(folder: Path, vocab_size: int = 320) -> Path:
    """Train a byte-level BPE tokenizer (`<|endoftext|>` = BOS/EOS/PAD/UNK, id 0) on fixture text; save it."""
    from training.tiny_lm import train_tokenizer
    tok = train_tokenizer(fixture_documents(), vocab_size)
    tok.save_pretrained(folder)
    return folder


def make_tiny_hf_model(arch: str, folder: Path, d_model: int = 32, n_layers: int = 2, n_heads: int = 4,
                       n_ctx: int = 64, seed: int = 0) -> Path:
    """Save a randomly initialised `arch` ("gpt_neox" or "gpt2") causal LM plus tokenizer into `folder`."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    make_tiny_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if arch == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=len(tok), hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
            intermediate_size=4 * d_model, max_position_embeddings=n_ctx, **ids))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tok), n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=n_ctx, **ids))
    else:
        raise ValueError(f"unknown arch {arch!r}; use one of {TINY_ARCHS}")
    model.save_pretrained(folder)
    return folder


def pytest_configure(config: pytest.Config) -> None:
    """Register the `gpu` marker: tests that need a CUDA GPU (skipped without one; `pytest -m gpu` runs them)."""
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one); run with pytest -m gpu")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One torch thread for the whole suite: the tests' tensors are tiny, and on a shared 2-core machine two
    threads oversubscribe the cores and make small forwards 30-100x slower."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a small trained byte-level BPE tokenizer (about 320 tokens)."""
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def tiny_neox_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random GPT-NeoX model (d_model 32, 2 layers, 4 heads, n_ctx 64) with tokenizer."""
    return make_tiny_hf_model("gpt_neox", tmp_path_factory.mktemp("tiny-gpt_neox"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random GPT-2 model (d_model 32, 2 layers, 4 heads, n_ctx 64) with tokenizer."""
    return make_tiny_hf_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session", params=TINY_ARCHS)
def tiny_hf_model(request: pytest.FixtureRequest) -> Path:
    """Each tiny random model folder in turn (tests using it run once per architecture)."""
    return request.getfixturevalue(f"tiny_{request.param}_dir")


@dataclass(frozen=True)
class LocalTextFiles:
    """Paths of small local datasets holding `documents` (the same texts in every file kind)."""

    documents: list[str]
    """The documents every file holds, in order."""
    txt: Path
    """Plain text, documents separated by blank lines."""
    jsonl: Path
    """JSON lines with columns "id", "title", "text"."""
    content_jsonl: Path
    """JSON lines whose text column is "content" (plus "id")."""
    parquet: Path
    """Parquet with columns "id", "title", "text"."""
    no_text_jsonl: Path
    """JSON lines with only non-text columns "id", "score"."""
    tokens_jsonl: Path
    """Pre-tokenised JSON lines: "input_ids" lists of ints (`token_rows`)."""
    token_rows: list[list[int]]
    """The rows of `tokens_jsonl`."""
    split_folder: Path
    """A folder with train.jsonl (documents[:-10]) and validation.jsonl (documents[-10:])."""


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    """Write records as JSON lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def local_text_files(tmp_path_factory: pytest.TempPathFactory) -> LocalTextFiles:
    """Small .txt, .jsonl, .parquet datasets (and a folder with train/validation files) of fixture text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("local-text")
    docs = fixture_documents()
    records = [{"id": i, "title": f"doc {i}", "text": d} for i, d in enumerate(docs)]
    (root / "docs.txt").write_text("\n\n".join(docs) + "\n")
    pq.write_table(pa.Table.from_pylist(records), root / "docs.parquet")
    token_rows = [[(7 * i + j) % 50 + 1 for j in range(5 + i % 3)] for i in range(12)]
    split_folder = root / "splits"
    split_folder.mkdir()
    _write_jsonl(split_folder / "train.jsonl", records[:-10])
    _write_jsonl(split_folder / "validation.jsonl", records[-10:])
    return LocalTextFiles(
        documents=docs,
        txt=root / "docs.txt",
        jsonl=_write_jsonl(root / "docs.jsonl", records),
        content_jsonl=_write_jsonl(root / "content.jsonl", [{"id": i, "content": d} for i, d in enumerate(docs)]),
        parquet=root / "docs.parquet",
        no_text_jsonl=_write_jsonl(root / "numbers.jsonl", [{"id": i, "score": i / 2} for i in range(5)]),
        tokens_jsonl=_write_jsonl(root / "tokens.jsonl", [{"input_ids": r} for r in token_rows]),
        token_rows=token_rows,
        split_folder=split_folder,
    )


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local .txt dataset of about 10k tokens (more than any Stage 1 test asks for)."""
    path = tmp_path_factory.mktemp("stage1-text") / "docs.txt"
    path.write_text("\n\n".join(fixture_documents(600)) + "\n")
    return path


def small_generate_cfg(model_dir: Path, text_file: Path, folder: Path, **kw):
    """A small Stage 1 config over a test model and text: layers 0-1 x residual and attn_concat, 3 chunks of 700
    rows, context 16, batch 4, on the CPU; `kw` overrides any flag."""
    from training.generate import GenerateConfig
    base = dict(model=str(model_dir), dataset=str(text_file), dataset_folder=str(folder), layers=[0, 1],
                locations=["residual", "attn_concat"], n_chunks=3, chunk_size=700, context_length=16,
                batch_size=4, device="cpu")
    return GenerateConfig(**(base | kw))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `folder` (a dataset folder: manifest.json included)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def sweep_killed_at_chunk(n: int) -> Iterator[None]:
    """Within the block, the sweep's chunk iterator dies as a kill would (KeyboardInterrupt) when it reaches its n-th
    chunk, and the block must end so; the real iterator is back afterwards."""
    import training.sweep as sweep_mod
    real_iter, seen = sweep_mod.iter_chunks, [0]

    def dying_iter(*args, **kwargs):
        for item in real_iter(*args, **kwargs):
            seen[0] += 1
            if seen[0] == n:
                raise KeyboardInterrupt
            yield item

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(sweep_mod, "iter_chunks", dying_iter)
        yield
