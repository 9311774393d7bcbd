"""Documents from every kind of source, and their packing into fixed-length token rows."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from training.cli import UserError
from training.corpus import BUILTIN_DATASET, builtin_documents
from training.text import (available_splits, iter_documents, pack_token_rows, special_token_ids,
                           tokenize_documents, tokenizer_adds_bos)


class CharTokenizer:
    """A stand-in tokenizer: one token per character (its code point); configurable BOS/EOS ids."""

    def __init__(self, bos: int | None = 1, eos: int | None = 2, adds_bos: bool = False) -> None:
        self.bos_token_id, self.eos_token_id, self.adds_bos = bos, eos, adds_bos
        self.pad_token_id = self.unk_token_id = None
        self.all_special_ids = [t for t in (bos, eos) if t is not None]

    def __call__(self, texts: Any, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        """{"input_ids": ids of one text or a list of ids per text}."""
        def encode(t: str) -> list[int]:
            prefix = [self.bos_token_id] if add_special_tokens and self.adds_bos else []
            return prefix + [ord(c) for c in t]
        return {"input_ids": encode(texts) if isinstance(texts, str) else [encode(t) for t in texts]}


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> Any:
    """The shared tiny BPE tokenizer, loaded."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


# ------------------------------------------------------------------------------------------ sources

def test_builtin_dataset() -> None:
    assert list(iter_documents(BUILTIN_DATASET, "validation")) == builtin_documents("validation")
    assert available_splits(BUILTIN_DATASET) == ["train", "validation", "test"]


def test_txt_paragraphs(local_text_files: Any) -> None:
    assert list(iter_documents(str(local_text_files.txt))) == local_text_files.documents


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "content_jsonl"])
def test_table_files_detect_text_column(local_text_files: Any, kind: str) -> None:
    path = getattr(local_text_files, kind)
    assert list(iter_documents(str(path))) == local_text_files.documents


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_explicit_text_column(local_text_files: Any, kind: str) -> None:
    docs = list(iter_documents(str(getattr(local_text_files, kind)), text_column="title"))
    assert docs == [f"doc {i}" for i in range(len(local_text_files.documents))]


def test_pretokenised_rows_are_lists_of_ints(local_text_files: Any) -> None:
    assert list(iter_documents(str(local_text_files.tokens_jsonl))) == local_text_files.token_rows


def test_folder_with_split_files(local_text_files: Any) -> None:
    folder = str(local_text_files.split_folder)
    assert available_splits(folder) == ["train", "validation"]
    assert list(iter_documents(folder, "validation")) == local_text_files.documents[-10:]
    assert list(iter_documents(folder, "train")) == local_text_files.documents[:-10]


def test_folder_without_split_names_is_one_train_split(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "values").mkdir()  # "val" + letters: not a split name
    (tmp_path / "values" / "b.txt").write_text("three\n")
    assert available_splits(str(tmp_path)) == ["train"]
    assert list(iter_documents(str(tmp_path))) == ["one", "two", "three"]


def test_hub_path_goes_through_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    calls = []

    def fake_load(name: str, config: Any = None, split: str = "train", streaming: bool = False) -> Any:
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"id": [1, 2], "content": ["first doc", "second doc"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert list(iter_documents("someone/corpus:v2", "train", streaming=True)) == ["first doc", "second doc"]
    assert calls == [("someone/corpus", "v2", "train", True)]


# ------------------------------------------------------------------------------------------- errors

def test_missing_local_path() -> None:
    with pytest.raises(UserError, match="does not exist"):
        iter_documents("./no/such/file.jsonl")  # raised at the call, not on iteration


def test_no_text_column_lists_columns(local_text_files: Any) -> None:
    with pytest.raises(UserError, match=r"no text column.*\['id', 'score'\]"):
        next(iter_documents(str(local_text_files.no_text_jsonl)))


def test_unknown_explicit_column(local_text_files: Any) -> None:
    with pytest.raises(UserError, match=r"column 'body' not found.*\['id', 'title', 'text'\]"):
        next(iter_documents(str(local_text_files.parquet), text_column="body"))


def test_non_text_column(local_text_files: Any) -> None:
    with pytest.raises(UserError, match="holds float values"):
        next(iter_documents(str(local_text_files.no_text_jsonl), text_column="score"))


def test_unknown_local_split_lists_splits(local_text_files: Any) -> None:
    with pytest.raises(UserError, match=r"unknown split 'test'.*\['train', 'validation'\]"):
        next(iter_documents(str(local_text_files.split_folder), "test"))


def test_unknown_hub_split_and_unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def unknown_split(*args: Any, **kwargs: Any) -> Any:
        raise ValueError('Unknown split "dev". Should be one of [\'train\', \'test\'].')

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", unknown_split)
    with pytest.raises(UserError, match=r"unknown split 'dev'.*\['train', 'test'\]"):
        next(iter_documents("someone/corpus", "dev"))
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="could not be loaded from the Hugging Face hub") as info:
        next(iter_documents("someone/corpus"))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ packing

def test_pack_joins_documents_with_eos_and_drops_leftover() -> None:
    tok = CharTokenizer(bos=1, eos=2)
    rows = list(pack_token_rows(["abc", "de", "fghij"], tok, context_length=4))
    stream = [97, 98, 99, 2, 100, 101, 2, 102, 103, 104, 105, 106, 2]
    assert rows == [stream[0:4], stream[4:8], stream[8:12]]


def test_pack_without_eos_puts_bos_before_each_document() -> None:
    rows = list(pack_token_rows(["ab", "cd"], CharTokenizer(bos=1, eos=None), context_length=3))
    assert rows == [[1, 97, 98], [1, 99, 100]]


def test_pack_prepends_bos_when_the_tokenizer_does() -> None:
    tok = CharTokenizer(bos=1, eos=2, adds_bos=True)
    assert tokenizer_adds_bos(tok) and not tokenizer_adds_bos(CharTokenizer())
    rows = list(pack_token_rows(["abcd", "ef"], tok, context_length=3))
    assert rows == [[1, 97, 98], [1, 99, 100], [1, 2, 101], [1, 102, 2]]
    assert list(pack_token_rows(["abcd"], tok, context_length=3, prepend_bos=False)) == [[97, 98, 99]]


def test_pack_passes_pretokenised_documents_verbatim() -> None:
    rows = list(pack_token_rows([[5, 6, 7, 8], "a", [9, 10, 11]], CharTokenizer(), context_length=4))
    assert rows == [[5, 6, 7, 8], [97, 2, 9, 10]]


def test_pack_matches_hand_tokenization(tiny_tokenizer: Any, local_text_files: Any) -> None:
    docs = local_text_files.documents[:20]
    eos = tiny_tokenizer.eos_token_id
    stream = [t for d in docs for t in tiny_tokenizer.encode(d, add_special_tokens=False) + [eos]]
    rows = list(pack_token_rows(iter_documents(str(local_text_files.jsonl)), tiny_tokenizer, 16))
    n = len(rows)
    assert n > 20 and all(len(r) == 16 for r in rows)
    assert rows[:20] == [stream[i * 16:(i + 1) * 16] for i in range(20)]
    assert sum(r.count(eos) for r in rows[:20]) == stream[:320].count(eos) > 0
    assert list(tokenize_documents(docs[:3], tiny_tokenizer, batch_size=2)) == [
        tiny_tokenizer.encode(d, add_special_tokens=False) for d in docs[:3]]


def test_pack_is_lazy() -> None:
    endless = ("word " * 10 for _ in itertools.count())
    rows = list(itertools.islice(pack_token_rows(endless, CharTokenizer(), 8, batch_size=4), 5))
    assert len(rows) == 5 and all(len(r) == 8 for r in rows)


def test_pack_rejects_bad_settings() -> None:
    with pytest.raises(UserError, match="context_length"):
        pack_token_rows(["abc"], CharTokenizer(), context_length=1)  # raised at the call, not on iteration
    with pytest.raises(UserError, match="neither an EOS nor a BOS"):
        pack_token_rows(["abc"], CharTokenizer(bos=None, eos=None), context_length=2)


def test_special_token_ids(tiny_tokenizer: Any) -> None:
    assert special_token_ids(tiny_tokenizer) == {0}
    assert special_token_ids(CharTokenizer(bos=1, eos=2)) == {1, 2}
