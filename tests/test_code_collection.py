"""The standard-library code collection: split by package, docstrings out of the documents,
and a folder every job reads (``retriever.io.formats.load_dataset``)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from retriever.io.formats import load_dataset
from retriever.pipelines.code_collection import (CodeCollectionConfig, _without_docstring,
                                                 first_paragraph)

PACKAGES = ["json", "textwrap", "string", "shlex", "fnmatch", "calendar", "email", "csv"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from jobs import code_collection

    out = tmp_path_factory.mktemp("code") / "stdlib-code"
    assert code_collection.main(["--out", str(out), "--packages", *PACKAGES,
                                 "--test-fraction", "0.4"]) == 0
    return out, json.loads((out / "manifest.json").read_text())


def test_no_package_is_in_both_splits(built):
    out, manifest = built
    train = load_dataset(str(out), "train")
    test = load_dataset(str(out), "test")
    package = lambda qid: qid.removeprefix("q:").split(".")[0]  # noqa: E731
    train_packages = {package(q) for q in train.qrels}
    test_packages = {package(q) for q in test.qrels}
    assert train_packages and test_packages and not train_packages & test_packages
    assert train_packages | test_packages <= set(PACKAGES)
    assert sorted(test_packages) == manifest["counts"]["test"]["packages"]
    assert set(train.queries).isdisjoint(test.queries)  # a query's text is in its split only
    # every query judges its own function relevant, a document of the shared corpus
    assert len(train.corpus) == manifest["docs"] == len(train.qrels) + len(test.qrels)
    for qid, judged in {**train.qrels, **test.qrels}.items():
        assert judged == {qid.removeprefix("q:"): 1}
    # deterministic: the same settings give the same bytes
    again = CodeCollectionConfig(out=str(out.parent / "again"), packages=PACKAGES,
                                 test_fraction=0.4)
    from retriever.pipelines.code_collection import build_code_collection

    build_code_collection(again)
    for name in ("corpus.jsonl", "queries_train.jsonl", "qrels/test.tsv"):
        assert (out / name).read_bytes() == (out.parent / "again" / name).read_bytes()


def test_documents_are_the_code_without_its_docstring(built):
    out, _ = built
    dataset = load_dataset(str(out), "test")
    train = load_dataset(str(out), "train")
    queries = {**train.queries, **dataset.queries}
    corpus = dict(zip(dataset.corpus.ids, dataset.corpus.texts))
    assert "json.dumps" in corpus and "shlex.split" in corpus
    for doc_id, code in corpus.items():
        tree = ast.parse(code)  # dedented source that parses on its own
        function = tree.body[0]
        assert isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert ast.get_docstring(function) is None, doc_id
        assert queries[f"q:{doc_id}"] not in code
        assert not doc_id.split(".")[-1].startswith("_")
    assert corpus["json.dumps"].startswith("def dumps(")


def test_docstring_removal_and_first_paragraph():
    source = ('class A:\n    @staticmethod\n    def f(x):\n        """Add one.\n\n'
              '        More text.\n        """\n        return x + 1\n'
              '    def g(self):\n        "Only a docstring."\n')
    tree = ast.parse(source)
    f, g = tree.body[0].body
    lines = source.splitlines(keepends=True)
    assert _without_docstring(lines, f) == "@staticmethod\ndef f(x):\n    return x + 1\n"
    assert _without_docstring(lines, g) is None
    assert first_paragraph(ast.get_docstring(f, clean=False)) == "Add one."
    assert first_paragraph("Split the\n    string  s.\n\n    Details.") == "Split the string s."


def test_bad_settings_are_named(tmp_path):
    from retriever.errors import InputError
    from retriever.pipelines.code_collection import build_code_collection

    with pytest.raises(ValueError, match="test_fraction"):
        CodeCollectionConfig(test_fraction=1.0)
    with pytest.raises(InputError, match="at least 2"):
        build_code_collection(CodeCollectionConfig(out=str(tmp_path / "x"), packages=["json"]))
