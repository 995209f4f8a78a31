"""A code-retrieval test collection generated from the running interpreter's standard library.

Published code-search sets (CodeSearchNet, CoIR) cannot be downloaded here; the standard
library is real, documented code that every machine has. In: the ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` (read and parsed with ``ast``, never imported). Out: a BEIR
folder in the store, as ``retriever split`` writes one:

- ``corpus.jsonl``: one document per public function or public method of a public class
  (``_id`` = ``module.qualname``, empty title): its source, dedented, with the docstring
  removed (a function whose body is only its docstring is left out);
- ``queries_<split>.jsonl``: per document, the first paragraph of its docstring (whitespace
  collapsed; at least ``min_query_words`` words); a text shared by several functions is
  ambiguous and dropped;
- ``qrels/<split>.tsv``: each query judges its own function relevant (grade 1);
- ``manifest.json`` (last): the interpreter, the modules of every split, counts, settings.

Split by module, not by query: a top-level package (``email``, ``xml``, ``json``...) with all
its submodules goes to ``test`` or ``train`` by the rank of ``sha256(f"{seed}:{package}")``
(``retriever.io.splits.assign``), so no test module's code or docstrings are train queries or
positives. The corpus is shared (test functions are distractors for train queries, as in a
BEIR folder); deterministic for a given interpreter and seed (files and nodes in sorted order).
"""

from __future__ import annotations

import ast
import inspect
import json
import sys
import sysconfig
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from retriever.config import to_dict
from retriever.errors import InputError
from retriever.io import store
from retriever.io.formats import write_qrels
from retriever.io.splits import assign

# Not library code, or not importable/meaningful as a code-search corpus.
SKIPPED_PACKAGES = frozenset({"test", "idlelib", "lib2to3", "turtledemo", "ensurepip",
                              "site-packages", "dist-packages", "config-3", "this",
                              "antigravity", "__phello__", "pydoc_data", "venv"})


@dataclass
class CodeCollectionConfig:
    """Build the Python standard library code-retrieval collection into the store."""

    out: str | None = field(default=None, metadata={
        "help": "output folder URL (default <store>/datasets/python-stdlib-code-s<seed>)"})
    test_fraction: float = field(default=0.2, metadata={
        "help": "share of top-level packages held out for test"})
    seed: int = 0
    min_query_words: int = field(default=4, metadata={
        "help": "shortest docstring first paragraph kept as a query"})
    packages: list[str] | None = field(default=None, metadata={
        "help": "only these top-level packages/modules (default: the whole standard library)"})

    def __post_init__(self):
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.min_query_words < 1:
            raise ValueError(f"min_query_words must be >= 1, got {self.min_query_words}")


@dataclass(frozen=True)
class CodeItem:
    doc_id: str  # module.qualname
    package: str  # the top-level package or module
    query: str
    code: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_files(root: Path, packages: list[str] | None = None) -> list[tuple[str, Path]]:
    """(dotted module name, path) of the public library modules under ``root``, sorted."""
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if (not parts or parts[0] in SKIPPED_PACKAGES or parts[0].startswith("config-")
                or any(p.startswith("_") or not p.isidentifier() for p in parts)
                or any(p in ("test", "tests") for p in parts)):
            continue
        if packages is None or parts[0] in packages:
            out.append((".".join(parts), path))
    return out


def first_paragraph(docstring: str) -> str:
    """The docstring's first paragraph, whitespace collapsed."""
    return " ".join(inspect.cleandoc(docstring).split("\n\n", 1)[0].split())


def _without_docstring(lines: list[str], node: ast.AST) -> str | None:
    """The function's source (dedented) minus its docstring; None if nothing else is left."""
    doc = node.body[0]
    if len(node.body) == 1 or doc.lineno <= node.lineno:
        return None  # a docstring-only body, or a docstring on the ``def`` line
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    kept = lines[start - 1:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
    return textwrap.dedent("".join(kept)).rstrip() + "\n"


def _public_functions(tree: ast.Module):
    """(qualname, node) of module-level public functions and public classes' methods."""
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, functions) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for child in node.body:
                if isinstance(child, functions) and not child.name.startswith("_"):
                    yield f"{node.name}.{child.name}", child


def module_items(module: str, path: Path, min_query_words: int) -> list[CodeItem]:
    """The collection's documents and queries from one source file (unparsable: none)."""
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines(keepends=True)
    items = []
    for qualname, node in _public_functions(tree):
        docstring = ast.get_docstring(node, clean=False)
        if not docstring:
            continue
        query = first_paragraph(docstring)
        code = _without_docstring(lines, node)
        if code and len(query.split()) >= min_query_words:
            items.append(CodeItem(f"{module}.{qualname}", module.split(".")[0], query, code))
    return items


def collect(config: CodeCollectionConfig, root: Path | None = None) -> list[CodeItem]:
    """Every item of the collection: unique ids, queries whose text no other item shares."""
    items, seen = [], set()
    for module, path in module_files(root or stdlib_root(), config.packages):
        for item in module_items(module, path, config.min_query_words):
            if item.doc_id not in seen:  # a name defined twice: the first definition
                seen.add(item.doc_id)
                items.append(item)
    texts: dict[str, int] = {}
    for item in items:
        texts[item.query] = texts.get(item.query, 0) + 1
    return [item for item in items if texts[item.query] == 1]


def build_code_collection(config: CodeCollectionConfig) -> dict:
    """Generate and write the folder; returns its manifest (with ``out``)."""
    items = collect(config)
    packages = sorted({item.package for item in items})
    if len(packages) < 2:
        raise InputError(f"packages {config.packages}: found {len(packages)} package(s) with "
                         "documented public functions; a train/test split needs at least 2")
    split_of = {package: name for name, group in
                assign(packages, {"test": config.test_fraction}, config.seed).items()
                for package in group}
    out = config.out or store.join(store.default_root(), "datasets",
                                   f"python-stdlib-code-s{config.seed}")
    store.write_text(store.join(out, "corpus.jsonl"), "".join(
        json.dumps({"_id": i.doc_id, "title": "", "text": i.code}, ensure_ascii=False) + "\n"
        for i in items))
    counts = {}
    for split in ("train", "test"):
        chosen = [i for i in items if split_of[i.package] == split]
        store.write_text(store.join(out, f"queries_{split}.jsonl"), "".join(
            json.dumps({"_id": f"q:{i.doc_id}", "text": i.query}, ensure_ascii=False) + "\n"
            for i in chosen))
        write_qrels({f"q:{i.doc_id}": {i.doc_id: 1} for i in chosen},
                    store.join(out, "qrels", f"{split}.tsv"))
        counts[split] = {"queries": len(chosen),
                         "packages": sorted({i.package for i in chosen})}
    manifest = {"kind": "code-collection", "out": out, "docs": len(items), "counts": counts,
                "python": sys.version, "stdlib": str(stdlib_root()),
                "rule": "package to test by rank of sha256(f'{seed}:{package}')",
                "settings": to_dict(config)}
    store.write_json(store.join(out, "manifest.json"), manifest)
    return manifest
