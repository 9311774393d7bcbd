"""The built-in Python-docs corpus: deterministic, split cleanly, free of machine-specific text."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from training.cli import UserError
from training.corpus import BUILTIN_DATASET, SPLIT_FRACTIONS, all_documents, builtin_documents, document_bucket

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DIGEST_SNIPPET = ("import hashlib\nfrom training.corpus import builtin_documents\n"
                   "print(hashlib.sha256('\\0'.join(builtin_documents('train')).encode()).hexdigest())")


def _digest(docs: list[str]) -> str:
    """sha256 of a document list."""
    return hashlib.sha256("\0".join(docs).encode()).hexdigest()


def test_name_and_size() -> None:
    docs = all_documents()
    assert BUILTIN_DATASET == "python-docs"
    assert len(docs) > 300 and sum(map(len, docs)) > 1_000_000
    assert any(d.startswith("Module json\n") for d in docs)
    assert all(isinstance(d, str) and d.strip() == d and d for d in docs)
    assert len(set(docs)) == len(docs)


def test_same_in_process_and_across_processes() -> None:
    train = builtin_documents("train")
    assert builtin_documents("train") == train
    env = dict(os.environ, PYTHONHASHSEED="123", PYTHONPATH=REPO_ROOT, SOME_UNRELATED_VAR="x" * 30)
    out = subprocess.run([sys.executable, "-c", _DIGEST_SNIPPET], env=env, cwd="/", capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == _digest(train)


def test_splits_are_disjoint_and_cover_the_corpus() -> None:
    parts = {s: builtin_documents(s) for s in SPLIT_FRACTIONS}
    assert sum(len(p) for p in parts.values()) == len(all_documents())
    seen: set[str] = set()
    for docs in parts.values():
        assert docs and not seen.intersection(docs)
        seen.update(docs)
    assert 0.02 < len(parts["validation"]) / len(all_documents()) < 0.1


def test_bucket_is_stable() -> None:
    assert document_bucket("hello") == document_bucket("hello")
    assert 0.0 <= document_bucket("hello") < 1.0
    assert document_bucket([1, 2, 3]) != document_bucket([1, 2, 4])


def test_no_machine_specific_text() -> None:
    text = "\n".join(all_documents())
    assert sys.executable not in text and sys.prefix not in text
    home = os.path.expanduser("~")
    if len(home) > 5:
        assert home + "/" not in text
    assert " at 0x" not in text


def test_unknown_split_lists_valid_ones() -> None:
    with pytest.raises(UserError, match="train.*validation|validation.*train"):
        builtin_documents("dev")
