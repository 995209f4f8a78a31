"""An evaluation matrix: models x datasets, each cell a run keyed by what decides its numbers.

A model entry is a string (``bm25``, a packaged name, a path, or a hybrid ``bm25+<model>``)
or a mapping with ``name``, ``model`` and any other ``EncoderConfig`` field (``prompt``,
``pooling``, prefixes, max lengths, ``dtype``, ...); a hybrid's mapping may also set
``fusion`` (rrf | weighted), ``rrf_k`` and ``hybrid_weight`` (``retriever.index.fusion``).
A dataset entry is a path/URL or a mapping with ``name``, ``path`` and ``split``.

A run's key hashes the model spec, the model weights' fingerprint, the dataset files' sizes and
checksums, and the retrieval settings; a finished run (``provenance.json`` holding the same key
next to ``metrics.json``, ``per_query.json`` and ``run.trec``) is reused instead of recomputed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields

from retriever.io import store
from retriever.errors import InputError
from retriever.index.fusion import FusionConfig, hybrid_dense_model

# A cell's per-query metric values ({metric: {query id: value}}), unrounded.
PER_QUERY = "per_query.json"
# A hybrid entry's fusion options -> FusionConfig fields.
FUSION_OPTIONS = {"fusion": "method", "rrf_k": "rrf_k", "hybrid_weight": "weight"}


def _encoder_options() -> set[str]:
    """EncoderConfig fields a model entry may set besides ``model``."""
    from retriever.modeling.encoder import EncoderConfig

    return {f.name for f in fields(EncoderConfig)} - {"model"}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model: str
    options: tuple = ()  # sorted (key, value) pairs of Encoder options
    fusion: FusionConfig | None = None  # set for a hybrid (bm25+<model>) only
    datasets: tuple = ()  # the dataset names it runs on; empty: every dataset of the matrix

    @property
    def is_bm25(self) -> bool:
        return self.model == "bm25"

    @property
    def dense_model(self) -> str | None:
        """A hybrid's dense model (``bm25+minilm`` -> ``minilm``), else None."""
        return hybrid_dense_model(self.model)

    @property
    def artefact_name(self) -> str:
        """Names its embeddings and index folders: a hybrid shares its dense model's."""
        dense = self.dense_model
        return _last_segment(dense) if dense else self.name

    def encoder_options(self) -> dict:
        return dict(self.options)

    def encoder_config(self):
        """The ``EncoderConfig`` this entry names (a hybrid's dense model; not for ``bm25``)."""
        from retriever.modeling.encoder import EncoderConfig

        return EncoderConfig(model=self.dense_model or self.model, **self.encoder_options())

    @classmethod
    def parse(cls, entry) -> "ModelSpec":
        if isinstance(entry, str):
            return cls(name=_last_segment(entry), model=entry,
                       fusion=FusionConfig() if hybrid_dense_model(entry) else None)
        if not isinstance(entry, dict) or "model" not in entry:
            raise InputError(f"model entry {entry!r}: expected a name/path or a mapping with "
                             "'model'")
        label = repr(entry.get("name", entry["model"]))
        hybrid = hybrid_dense_model(entry["model"]) is not None
        allowed = _encoder_options()
        unknown = (set(entry) - allowed - {"name", "model", "datasets"}
                   - (set(FUSION_OPTIONS) if hybrid else set()))
        if unknown:
            raise InputError(f"model entry {label}: unknown option(s) "
                             f"{', '.join(sorted(unknown))}"
                             + (" (fusion options are for bm25+<model> entries)"
                                if unknown & set(FUSION_OPTIONS) else ""))
        options = tuple(sorted((k, v) for k, v in entry.items() if k in allowed))
        name = entry.get("name") or _last_segment(entry["model"])
        fusion = None
        if hybrid:
            try:
                fusion = FusionConfig(**{field: entry[key] for key, field
                                         in FUSION_OPTIONS.items() if key in entry})
            except (InputError, TypeError) as err:
                raise InputError(f"model entry {label}: {err}") from err
        return cls(name=name, model=entry["model"], options=options, fusion=fusion,
                   datasets=_dataset_names(entry.get("datasets", ()), label))

    def runs_on(self, dataset: str) -> bool:
        return not self.datasets or dataset in self.datasets


def _dataset_names(names, label: str) -> tuple:
    """A model entry's ``datasets:`` (the cells it runs; the others stay empty, e.g. a slow
    backbone left off a side collection): a list of dataset names."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise InputError(f"model entry {label}: datasets must be a list of dataset names, got "
                         f"{names!r}")
    return tuple(names)


def check_dataset_names(models: list[ModelSpec], datasets: list["DatasetSpec"]) -> None:
    """Refuse a model entry's ``datasets:`` naming a dataset the matrix does not have."""
    known = {d.name for d in datasets}
    for model in models:
        unknown = sorted(set(model.datasets) - known)
        if unknown:
            raise InputError(f"model entry {model.name!r}: datasets {', '.join(unknown)} not in "
                             f"the matrix (its datasets: {', '.join(sorted(known))})")


def _last_segment(path: str) -> str:
    """The default name of a model or dataset entry: its path's last segment."""
    return path.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    path: str
    split: str = "test"

    @classmethod
    def parse(cls, entry) -> "DatasetSpec":
        if isinstance(entry, str):
            return cls(name=_last_segment(entry), path=entry)
        if not isinstance(entry, dict) or "path" not in entry:
            raise InputError(f"dataset entry {entry!r}: expected a path or a mapping with "
                             "'path'")
        path = entry["path"]
        return cls(name=entry.get("name") or _last_segment(path), path=path,
                   split=entry.get("split", "test"))


def dataset_fingerprint(files: dict[str, str]) -> str:
    """sha256 over the dataset's corpus, queries and qrels bytes."""
    digest = hashlib.sha256()
    for role in sorted(files):
        digest.update(role.encode())
        digest.update(hashlib.sha256(store.read_bytes(files[role])).digest())
    return digest.hexdigest()[:16]


def cell_key(model: ModelSpec, model_hash: str, dataset_hash: str, settings: dict) -> str:
    """What a finished matrix cell (model x dataset run) must match to be reused."""
    payload = {"model": model.model, "options": model.encoder_options(),
               "model_hash": model_hash, "dataset_hash": dataset_hash, "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class RunRecord:
    model: str
    dataset: str
    folder: str
    key: str
    reused: bool
    metrics: dict = field(default_factory=dict)


def finished(folder: str, key: str) -> dict | None:
    """The stored metrics if ``folder`` holds a complete run with this key, else None."""
    provenance_url = store.join(folder, "provenance.json")
    metrics_url = store.join(folder, "metrics.json")
    if not all(store.exists(url) for url in (provenance_url, metrics_url,
                                             store.join(folder, "run.trec"),
                                             store.join(folder, PER_QUERY))):
        return None
    if store.read_json(provenance_url).get("key") != key:
        return None
    return store.read_json(metrics_url)
