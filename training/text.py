"""Documents -> packed token rows: where the text comes from and how it becomes fixed-length rows.

A dataset name is one of:
  * `python-docs` (training.corpus.BUILTIN_DATASET): the built-in corpus, splits train/validation/test;
  * a local `.txt`, `.jsonl` (or `.json`), `.parquet` file, or a folder holding such files (searched
    recursively, read in sorted path order). In a `.txt` file each paragraph (text between blank
    lines) is one document. In a folder, files whose name (or top folder) starts with a split name
    (`train`, `validation`/`valid`/`val`/`dev`, `test`, followed by a non-letter, e.g.
    `train-00000.parquet`, `validation/x.jsonl`) form that split; when no file is named
    that way, all files are the one split "train". Local files are read lazily, row by row;
  * anything else: a Hugging Face hub dataset, `name` or `name:config`, loaded with
    `datasets.load_dataset(name, config, split=split, streaming=streaming)`.

Rows of a table-like dataset: the text column is `text_column` when given, else the first of
TEXT_COLUMNS present, else the first of TOKEN_COLUMNS (a pre-tokenised dataset, whose rows are
lists of token ids used as they are).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from training.cli import UserError
from training.corpus import BUILTIN_DATASET, SPLIT_FRACTIONS, builtin_documents

Document = str | list[int]
"""A document: text, or the token ids of a pre-tokenised dataset."""

TEXT_COLUMNS = ("text", "content", "document", "body", "raw_content", "article", "story", "passage",
                "sentence", "code")
"""Column names taken to hold the text, in order of preference."""

TOKEN_COLUMNS = ("input_ids", "tokens", "token_ids")
"""Column names taken to hold token ids (a pre-tokenised dataset), used when no text column exists."""

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
"""File kinds read from local paths."""

SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
"""File-name prefixes that put a local file in a split."""


# ----------------------------------------------------------------------------------------- sources

def iter_documents(dataset: str, split: str = "train", text_column: str | None = None,
                   streaming: bool = False) -> Iterator[Document]:
    """An iterator over the documents (text, or token-id lists) of one split of a dataset, in a fixed order.

    Bad input (missing path, unknown split, no text column) raises a UserError here, at the call;
    the documents themselves are read lazily. `streaming` only matters for hub datasets (local
    files are always read lazily).
    """
    if dataset == BUILTIN_DATASET:
        return iter(builtin_documents(split))
    if _is_local(dataset):
        return _iter_local(Path(dataset).expanduser(), split, text_column)
    return _iter_hub(dataset, split, text_column, streaming)


def available_splits(dataset: str) -> list[str]:
    """The split names a dataset has (for a hub dataset this asks the hub)."""
    if dataset == BUILTIN_DATASET:
        return list(SPLIT_FRACTIONS)
    if _is_local(dataset):
        return sorted(_local_split_files(Path(dataset).expanduser()))
    import datasets
    name, config = _hub_name(dataset)
    try:
        return list(datasets.get_dataset_split_names(name, config))
    except Exception as e:  # noqa: BLE001 - any hub failure is the user's dataset name / network
        raise UserError(_hub_failure(dataset, e)) from None


def _is_local(dataset: str) -> bool:
    """Whether `dataset` names a local path: it exists, or it looks like a path (raise if missing)."""
    path = Path(dataset).expanduser()
    if path.exists():
        return True
    looks_like_path = (dataset.startswith((".", "/", "~")) or dataset.endswith(LOCAL_SUFFIXES)
                       or os.sep + os.sep in dataset or dataset.count("/") > 1)
    if looks_like_path:
        raise UserError(f"local dataset path {dataset!r} does not exist; give an existing .txt/.jsonl/"
                        f".parquet file or folder, {BUILTIN_DATASET!r}, or a hub dataset name")
    return False


# ------------------------------------------------------------------------------------- local files

def _iter_local(path: Path, split: str, text_column: str | None) -> Iterator[Document]:
    """Documents of one split of a local file or folder (columns checked now, rows read lazily)."""
    by_split = _local_split_files(path)
    if split not in by_split:
        raise UserError(f"unknown split {split!r} of local dataset {str(path)!r}; it has {sorted(by_split)}"
                        " (name files train*/validation*/test* in a folder to make splits)")
    files = [(file, _file_column(file, text_column)) for file in by_split[split]]
    return itertools.chain.from_iterable(_file_documents(file, column) for file, column in files)


def _local_split_files(path: Path) -> dict[str, list[Path]]:
    """{split: its files} of a local file or folder (all files are "train" unless named by split)."""
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"cannot read {str(path)!r}: use a {'/'.join(LOCAL_SUFFIXES)} file")
        return {"train": [path]}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise UserError(f"folder {str(path)!r} holds no {'/'.join(LOCAL_SUFFIXES)} files")
    by_split: dict[str, list[Path]] = {}
    for file in files:
        split = _split_of_file(file.relative_to(path))
        if split is not None:
            by_split.setdefault(split, []).append(file)
    return by_split or {"train": files}


def _split_of_file(rel: Path) -> str | None:
    """The split a file's name (or its top folder's name) starts with, if any ("train-0001.parquet")."""
    for name in (rel.parts[0].lower(), rel.name.lower()):
        for split, prefixes in SPLIT_ALIASES.items():
            if any(re.match(re.escape(p) + r"(?![a-z])", name) for p in prefixes):
                return split
    return None


def _file_column(path: Path, text_column: str | None) -> str | None:
    """The column to read from a local file (None for .txt), checked against the file's columns."""
    if path.suffix == ".txt":
        if text_column is not None:
            raise UserError(f"--text_column does not apply to the .txt file {str(path)!r} (drop it)")
        return None
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        columns = pq.ParquetFile(path).schema_arrow.names
    else:
        columns = list(next(_json_records(path), {}))
    return pick_column(columns, text_column, where=str(path))


def _file_documents(path: Path, column: str | None) -> Iterator[Document]:
    """Documents of one local file, read lazily (`column` None: paragraphs of a .txt file)."""
    if column is None:
        yield from _txt_paragraphs(path)
        return
    values = _parquet_values(path, column) if path.suffix == ".parquet" else (
        record.get(column) for record in _json_records(path))
    for value in values:
        doc = _as_document(value, column, str(path))
        if doc is not None:
            yield doc


def _txt_paragraphs(path: Path) -> Iterator[str]:
    """Blank-line-separated paragraphs of a text file, read line by line."""
    lines: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip("\n")
                lines = []
    if lines:
        yield "".join(lines).rstrip("\n")


def _json_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file (or of a .json file holding one list of records)."""
    with path.open(encoding="utf-8") as f:
        first = f.read(1)
        while first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[":
            yield from json.load(f)
            return
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{str(path)!r} line {lineno} is not valid JSON: {e}") from None
                if not isinstance(record, dict):
                    raise UserError(f"{str(path)!r} line {lineno} is not a JSON object (one record per line)")
                yield record


def _parquet_values(path: Path, column: str) -> Iterator[Any]:
    """Values of one column of a parquet file, read one record batch at a time."""
    import pyarrow.parquet as pq
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[column]):
        yield from batch.column(0).to_pylist()


# -------------------------------------------------------------------------------------------- hub

def _hub_name(dataset: str) -> tuple[str, str | None]:
    """("name", "config" or None) from "name" or "name:config"."""
    name, _, config = dataset.partition(":")
    return name, config or None


def _hub_failure(dataset: str, e: Exception) -> str:
    """One line saying a hub dataset could not be used, and why."""
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return (f"dataset {dataset!r} is not a local path and could not be loaded from the Hugging Face hub "
            f"({type(e).__name__}: {reason}); check the name, or use {BUILTIN_DATASET!r} or a local file")


def _load_hub(dataset: str, split: str, streaming: bool) -> Any:
    """`datasets.load_dataset` of one split, with its failures turned into UserErrors."""
    import datasets
    name, config = _hub_name(dataset)
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except ValueError as e:
        if "split" in str(e).lower():
            raise UserError(f"unknown split {split!r} of dataset {dataset!r}: "
                            f"{str(e).strip().splitlines()[0]}") from None
        raise UserError(_hub_failure(dataset, e)) from None
    except Exception as e:  # noqa: BLE001 - missing dataset, no network, bad config ...
        raise UserError(_hub_failure(dataset, e)) from None


def _iter_hub(dataset: str, split: str, text_column: str | None, streaming: bool) -> Iterator[Document]:
    """Documents of one split of a hub dataset (loaded and its column checked now, rows read lazily)."""
    ds = _load_hub(dataset, split, streaming)
    columns = ds.column_names
    if columns is None:  # a streamed dataset without declared features: look at the first row
        columns = list(next(iter(ds), {}).keys())
    column = pick_column(list(columns), text_column, where=dataset)
    return _hub_documents(ds.select_columns([column]), column, dataset)


def _hub_documents(ds: Any, column: str, dataset: str) -> Iterator[Document]:
    """Documents of one column of a loaded hub dataset (`datasets.Dataset` or `IterableDataset`)."""
    for row in ds:
        doc = _as_document(row[column], column, dataset)
        if doc is not None:
            yield doc


# ---------------------------------------------------------------------------------------- columns

def pick_column(columns: Sequence[str], text_column: str | None, where: str) -> str:
    """The column to read: `text_column` if given, else a TEXT_COLUMNS then TOKEN_COLUMNS name present."""
    if text_column is not None:
        if text_column not in columns:
            raise UserError(f"column {text_column!r} not found in {where!r}; its columns are {list(columns)}")
        return text_column
    for name in TEXT_COLUMNS + TOKEN_COLUMNS:
        if name in columns:
            return name
    raise UserError(f"no text column found in {where!r} (its columns are {list(columns)}); "
                    f"pass --text_column NAME")


def _as_document(value: Any, column: str, where: str) -> Document | None:
    """A cell as a document: text, a list of token ids, or None for an empty cell."""
    if value is None or (isinstance(value, str) and not value):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return list(value) if value else None
    raise UserError(f"column {column!r} of {where!r} holds {type(value).__name__} values, not text or "
                    f"token ids; pick another with --text_column")


# ----------------------------------------------------------------------------------------- tokens

def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, PAD, UNK, and any other marked special)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            ids.add(int(tid))
    for tid, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    return ids


def separator_token_id(tokenizer: Any) -> int:
    """The token put between documents: EOS, or BOS when the tokenizer has no EOS."""
    for attr in ("eos_token_id", "bos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    raise UserError("the tokenizer defines neither an EOS nor a BOS token, so documents cannot be "
                    "separated; use a tokenizer that has one")


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of text it encodes (then the model expects BOS first)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def tokenize_documents(documents: Iterable[Document], tokenizer: Any,
                       batch_size: int = 64) -> Iterator[list[int]]:
    """Token ids of each document (no special tokens added), calling the tokenizer on batches of texts.

    Pre-tokenised documents (lists of ids) pass through unchanged, in order.
    """
    for ids, _ in _tokenized(documents, tokenizer, batch_size):
        yield ids


def _tokenized(documents: Iterable[Document], tokenizer: Any,
               batch_size: int) -> Iterator[tuple[list[int], bool]]:
    """(token ids, whether the document was text) for each document, in order."""
    texts: list[str] = []
    for doc in documents:
        if isinstance(doc, str):
            texts.append(doc)
            if len(texts) >= batch_size:
                yield from ((ids, True) for ids in _encode_batch(texts, tokenizer))
                texts = []
        else:
            yield from ((ids, True) for ids in _encode_batch(texts, tokenizer))
            texts = []
            yield [int(t) for t in doc], False
    yield from ((ids, True) for ids in _encode_batch(texts, tokenizer))


def _encode_batch(texts: list[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of a batch of texts (no special tokens, no length warnings)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def pack_token_rows(documents: Iterable[Document], tokenizer: Any, context_length: int, *,
                    prepend_bos: bool | None = None, batch_size: int = 64) -> Iterator[list[int]]:
    """Cut the tokenised documents, joined by separators, into rows of exactly `context_length` ids.

    The stream is doc1 EOS doc2 EOS ... (with a tokenizer that has no EOS: BOS doc1 BOS doc2 ...);
    each row is the next `context_length` ids of the stream and the leftover at the end is dropped.
    With `prepend_bos` (default: whether the tokenizer itself adds BOS when encoding, e.g. Llama or
    Gemma; not GPT-2, GPT-NeoX or the tiny LM) each row is BOS + the next `context_length - 1` ids.
    Pre-tokenised documents (lists of ids) go into the stream verbatim, with no separator added: they
    are expected to carry their own. Memory: one tokenizer batch plus the current document's ids.
    Yields lists of ints, each of length `context_length`. Bad settings raise a UserError at the call.
    """
    if context_length < 2:
        raise UserError(f"context_length must be at least 2 (got {context_length})")
    sep = separator_token_id(tokenizer)
    sep_after = getattr(tokenizer, "eos_token_id", None) is not None
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos is None:
        prepend_bos = tokenizer_adds_bos(tokenizer)
    if prepend_bos and bos is None:
        raise UserError("prepend_bos is set but the tokenizer has no BOS token")
    prefix = [int(bos)] if prepend_bos else []  # type: ignore[arg-type]
    return _packed_rows(_tokenized(documents, tokenizer, batch_size), sep, sep_after, prefix, context_length)


def _packed_rows(tokenized: Iterable[tuple[list[int], bool]], sep: int, sep_after: bool, prefix: list[int],
                 context_length: int) -> Iterator[list[int]]:
    """Rows of `prefix` + the next ids of the separator-joined stream, each `context_length` long."""
    body = context_length - len(prefix)
    buf: list[int] = []
    for ids, is_text in tokenized:
        if not is_text:
            buf.extend(ids)
        elif sep_after:
            buf.extend(ids)
            buf.append(sep)
        else:
            buf.append(sep)
            buf.extend(ids)
        start = 0
        while len(buf) - start >= body:
            yield prefix + buf[start:start + body]
            start += body
        del buf[:start]
