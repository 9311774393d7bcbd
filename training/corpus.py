"""The built-in corpus: text that ships with Python itself, so the toolkit runs with no download.

Documents, in a deterministic (sorted) order that is identical on every run of one Python version:
  * one per topic of the interactive help (`pydoc_data.topics.topics`), the language reference;
  * one per standard-library module: its docstring, then, for each class and function the module
    defines (sorted by name), a `class X(...)` / `def f(...)` header and its docstring, and for a
    class the docstrings of the methods it defines.
Modules come from the stdlib folder only (never site-packages), walked without importing packages
to list them; each is imported defensively (import errors and warnings swallowed) and modules with
side effects on import (`this`, `antigravity`, `__main__` modules, tkinter, idlelib, test suites,
...) are skipped. Documents are de-duplicated; a hash of each document assigns it to a split.

The documents are extracted in a fresh, isolated interpreter (`python -I -S this_file`): third-party
libraries patch the stdlib once imported (e.g. transformers adds methods to `logging.Logger`), so
extracting in the caller's process would make the corpus depend on what the caller imported; it
also keeps the side effects of importing ~600 modules out of the caller. The result is cached
in-process (about 1 s to build, 2.4 MB of text on Python 3.11).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import sysconfig
import warnings
from functools import lru_cache
from typing import Iterator, Sequence

BUILTIN_DATASET = "python-docs"
"""The `--dataset` name that means the built-in corpus."""

SPLIT_FRACTIONS: dict[str, tuple[float, float]] = {
    "train": (0.0, 0.9), "validation": (0.9, 0.95), "test": (0.95, 1.0)}
"""Each split's [low, high) range of `document_bucket` values: 90% / 5% / 5% of the documents."""

_SKIP_TOP = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "_tkinter", "test",
    "readline", "rlcompleter", "ensurepip", "venv", "pip", "__hello__", "__phello__", "lib2to3",
    "distutils", "xxlimited", "xxlimited_35", "xxsubtype", "_xxtestfuzz", "_ctypes_test",
})
"""Top-level modules never imported: side effects on import (open a browser, print, need a display,
install pip, ...), test helpers, or deprecated trees that only add noise."""

_SKIP_PARTS = frozenset({"__main__", "test", "tests", "idle_test"})
"""Any module path containing one of these components is skipped (scripts and test suites)."""

_MIN_DOC_CHARS = 20
"""Docstrings shorter than this are dropped (mostly "Return self+value." boilerplate)."""

_BOILERPLATE = ("Initialize self.", "Create and return a new object.")
"""Starts of the generic docstrings C types give `__init__`; left out."""

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def document_bucket(doc: str | Sequence[int]) -> float:
    """A stable number in [0, 1) from a document's content (text or token ids), for hash splits."""
    data = doc.encode("utf-8") if isinstance(doc, str) else b",".join(str(int(t)).encode() for t in doc)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") / 2.0**64


def in_split(doc: str | Sequence[int], split: str) -> bool:
    """Whether a document's hash bucket falls in `split` (one of SPLIT_FRACTIONS)."""
    low, high = SPLIT_FRACTIONS[split]
    return low <= document_bucket(doc) < high


def check_split(split: str) -> None:
    """Raise a UserError unless `split` is one of the hash splits."""
    from training.cli import UserError  # imported here: this file also runs as a bare script
    if split not in SPLIT_FRACTIONS:
        raise UserError(f"unknown split {split!r} of the {BUILTIN_DATASET!r} corpus; "
                        f"use one of {sorted(SPLIT_FRACTIONS)}")


def builtin_documents(split: str) -> list[str]:
    """The built-in corpus' documents of one split ("train", "validation" or "test"), in a fixed order."""
    check_split(split)
    return list(_split_documents(split))


@lru_cache(maxsize=None)
def _split_documents(split: str) -> tuple[str, ...]:
    """Cached documents of one split."""
    return tuple(d for d in all_documents() if in_split(d, split))


@lru_cache(maxsize=1)
def all_documents() -> tuple[str, ...]:
    """Every document of the built-in corpus (all splits), de-duplicated, in a fixed order."""
    env = {k: v for k, v in os.environ.items() if k == "SYSTEMROOT"}  # an empty environment (Windows needs it)
    out = subprocess.run([sys.executable, "-I", "-S", os.path.abspath(__file__)], capture_output=True,
                         cwd=os.path.abspath(os.sep), env=env)
    if out.returncode != 0:
        tail = out.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"building the {BUILTIN_DATASET!r} corpus failed: {tail}")
    return tuple(json.loads(out.stdout))


def extract_documents() -> list[str]:
    """Build the documents in this process (see the module docstring for why callers use a subprocess)."""
    seen: set[str] = set()
    docs: list[str] = []
    for doc in _iter_raw_documents():
        doc = _ADDRESS.sub("", doc).strip()
        if len(doc) >= _MIN_DOC_CHARS and doc not in seen:
            seen.add(doc)
            docs.append(doc)
    return docs


def _iter_raw_documents() -> Iterator[str]:
    """Help topics then module documents, before cleaning and de-duplication."""
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield topics[name]
    for modname in stdlib_module_names():
        module = _import_quietly(modname)
        if module is not None:
            yield module_document(module)


def stdlib_module_names() -> list[str]:
    """Sorted names of the importable standard-library modules (built-in, pure Python, extensions)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    names = {n for n in sys.builtin_module_names if n not in _SKIP_TOP}
    names.update(_walk_modules([stdlib, os.path.join(stdlib, "lib-dynload")], prefix=""))
    return sorted(names)


def _walk_modules(paths: list[str], prefix: str) -> set[str]:
    """Module names found under `paths` (recursing into packages without importing them)."""
    found: set[str] = set()
    for info in pkgutil.iter_modules(paths):
        name = prefix + info.name
        if not prefix and info.name in _SKIP_TOP:
            continue
        if _SKIP_PARTS.intersection(name.split(".")) or info.name.startswith("test"):
            continue
        found.add(name)
        if info.ispkg:
            pkg_dir = os.path.join(info.module_finder.path, info.name)  # type: ignore[union-attr]
            found.update(_walk_modules([pkg_dir], prefix=name + "."))
    return found


def _import_quietly(name: str) -> object | None:
    """Import a module with warnings and its stdout/stderr silenced; None when it fails."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - any failure (even SystemExit) just skips the module
        return None


def module_document(module: object) -> str:
    """One document for a module: its docstring plus its own classes' and functions' docstrings."""
    modname = getattr(module, "__name__", "")
    parts = [f"Module {modname}"]
    parts += _clean_doc(getattr(module, "__doc__", None))
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != modname:
            continue
        if inspect.isclass(obj):
            parts += _class_parts(name, obj)
        elif inspect.isroutine(obj):
            parts += _function_parts(name, obj, indent="")
    return "\n\n".join(parts)


def _class_parts(name: str, cls: type) -> list[str]:
    """Header + docstring of a class, then those of the methods it defines itself."""
    doc = _clean_doc(cls.__doc__)
    parts = [f"class {name}:" + ("\n" + _indent(doc[0], "    ") if doc else "")]
    for meth_name, meth in sorted(vars(cls).items()):
        if meth_name.startswith("_") and meth_name != "__init__":
            continue
        func = meth.__func__ if isinstance(meth, (staticmethod, classmethod)) else meth
        if inspect.isroutine(func):
            parts += _function_parts(meth_name, func, indent="    ")
    return parts if len(parts) > 1 or doc else []


def _function_parts(name: str, func: object, indent: str) -> list[str]:
    """`def name(signature):` followed by the indented docstring; [] without a docstring."""
    doc = _clean_doc(getattr(func, "__doc__", None))
    if not doc or doc[0].startswith(_BOILERPLATE):
        return []
    return [f"{indent}def {name}{_signature(func)}:\n" + _indent(doc[0], indent + "    ")]


def _signature(func: object) -> str:
    """The parameter list as text, e.g. "(a, b=None, *args, key=...)"; "(...)" when Python cannot tell.

    Only literal defaults (None, bools, numbers, short strings) are written out; any other default
    becomes "..." so that no run-time state (e.g. `os.environ`, object addresses) leaks in.
    """
    try:
        sig = inspect.signature(func)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - C functions raise all sorts here
        return "(...)"
    params = []
    for p in sig.parameters.values():
        default = p.default
        if default is not inspect.Parameter.empty and not _is_literal(default):
            default = _Ellipsis()
        params.append(p.replace(annotation=inspect.Parameter.empty, default=default))
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


class _Ellipsis:
    """A default value that prints as "..."."""

    def __repr__(self) -> str:
        return "..."


def _is_literal(value: object) -> bool:
    """Whether `value` prints the same in every process: None, a bool, a number or a short string."""
    if isinstance(value, (str, bytes)):
        text = value if isinstance(value, str) else value.decode("latin-1")
        return len(text) <= 40 and not _looks_like_path(text)
    return value is None or isinstance(value, (bool, int, float))


def _looks_like_path(text: str) -> bool:
    """Whether a string default is probably a machine-specific path (e.g. `sys.executable`)."""
    return text.startswith(("/", "~")) or ":\\" in text or os.sep + "bin" + os.sep in text


def _clean_doc(doc: object) -> list[str]:
    """[the docstring with indentation removed] or [] when absent or too short."""
    if not isinstance(doc, str):
        return []
    text = inspect.cleandoc(doc)
    return [text] if len(text) >= _MIN_DOC_CHARS else []


def _indent(text: str, prefix: str) -> str:
    """Prefix every non-empty line of `text`."""
    return "\n".join(prefix + line if line else line for line in text.splitlines())


def corpus_stats() -> dict[str, int]:
    """Size of the built-in corpus: documents and characters, in all and per split."""
    docs = all_documents()
    stats = {"documents": len(docs), "chars": sum(map(len, docs))}
    for split in SPLIT_FRACTIONS:
        part = _split_documents(split)
        stats[f"{split}_documents"] = len(part)
        stats[f"{split}_chars"] = sum(map(len, part))
    return stats


if __name__ == "__main__":  # run by all_documents() as `python -I -S corpus.py`: print the documents as JSON
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _docs = extract_documents()
    sys.stdout.buffer.write(json.dumps(_docs).encode("ascii"))
