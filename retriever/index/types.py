"""Index types: what to build (:class:`IndexSpec`), its FAISS factory string, the index
itself (:func:`new_index`), its search parameters, and its bytes per vector (:func:`footprint`).

One spec in, one factory string out, and both the index job (``retriever.index.shards``) and
the capacity plan (``retriever.ops.capacity``) go through it, so the plan sizes exactly what
the job writes. All types score by inner product (cosine on L2-normalised embeddings):

- ``flat``    ``Flat``                            exact; 4d bytes a vector
- ``ivfpq``   ``IVF{nlist},PQ{m}x{nbits}np[,Refine(SQ8)]``  PQ candidates re-ranked by SQ8 codes
- ``hnsw``    ``HNSW{M},Flat``                    graph over float vectors
- ``sq8``     ``SQ8[,Refine(SQfp16)]``            8-bit scalar quantised scan (d bytes) whose
  ``k_factor`` x k best are rescored by their fp16 vectors (2d bytes): SQ8 alone reaches ~0.99
  recall@10 on MiniLM/SciFact; the rescoring makes the top-k exact for ~3d bytes in all
  (``refine`` ``Flat`` rescores with fp32, ``none`` keeps d bytes).
- ``binary``  ``LSH,Refine(SQ8)``                 the sign bit of every dimension (d/8 bytes),
  searched by Hamming distance, and the ``k_factor`` x k nearest rescored by SQ8 codes (d
  bytes). FAISS' ``IndexLSH`` without rotation or trained thresholds stores exactly the sign
  bits (bit j of byte i = dimension 8i+j > 0) and searches them with the Hamming kernels of
  ``IndexBinaryFlat`` (the tests check the two agree); being a float index it composes with
  ``IndexRefine``, so the rescoring store lives in the same FAISS file and ``k_factor`` is
  FAISS' own. SQ8 rather than float32 for the store: 1.125d bytes in all instead of 4.125d,
  and SQ8 ranks like float32 to ~0.99 recall@10. Sign bits alone reach ~0.56 recall@10 on
  MiniLM (Hamming distances are not inner products), so binary always has a rescoring store.

Bytes per vector (:func:`footprint`) follow FAISS' serialisation (``faiss/impl/index_write.cpp``):
a flat store keeps ``code_size`` bytes a vector (fp32: 4d, SQ8: d, SQfp16: 2d, LSH: d/8, PQ:
m x nbits / 8); an IVF list adds the vector's int64 id (8 B), and the shard holds the coarse
centroids (nlist x d x 4) and list sizes (nlist x 8); PQ codebooks are 2^nbits x d x 4, SQ8
ranges 2 x d x 4; HNSW adds its links, 2M int32 on level 0 and M per upper level (a vector
reaches level l with probability M^-l, so M/(M-1) more on average), a level (int32) and an
offset (int64) a vector (Malkov & Yashunin 2018, FAISS ``HNSW::set_default_probas``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import faiss

from retriever.errors import InputError

TYPES = ("flat", "ivfpq", "hnsw", "sq8", "binary")
METRIC = "inner_product"
# FAISS warns below 39 training points per centroid; fewer gives poor centroids.
MIN_POINTS_PER_CENTROID = 39
DEFAULT_REFINE = {"ivfpq": "SQ8", "sq8": "SQfp16", "binary": "SQ8"}
REFINE_CHOICES = ("default", "SQ8", "SQfp16", "Flat", "none")
PARAM = {"ivfpq": "nprobe", "hnsw": "efSearch"}  # k_factor for sq8 / binary with rescoring
K_FACTORS = [1, 2, 4, 8, 16, 32, 64]


@dataclass
class IndexSpec:
    """What to build; ``None`` fields are derived from the data (see ``factory_string``)."""

    type: str = "flat"
    factory: str | None = None  # an explicit FAISS factory string overrides the fields below
    nlist: int | None = None  # ivfpq: coarse centroids (default ~4 sqrt(rows), power of two)
    pq_m: int | None = None  # ivfpq: sub-quantisers (default ~dim / 8, a divisor of dim)
    pq_nbits: int | None = None  # ivfpq: bits per code (default 8, fewer for small samples)
    # rescoring codes (SQ8 | SQfp16 | Flat); "default": the type's own (DEFAULT_REFINE); None: none
    refine: str | None = "default"
    k_factor: int = 4  # ivfpq with refine: candidates re-ranked = k_factor x k
    hnsw_m: int = 32
    ef_construction: int = 200
    search_value: int | None = None  # nprobe / efSearch / k_factor; None = smallest reaching
    target_recall: float = 0.95
    recall_at: int = 10

    def __post_init__(self):
        if self.type not in TYPES:
            raise InputError(f"index type {self.type!r}: expected one of {', '.join(TYPES)}")
        if isinstance(self.refine, str) and self.refine.lower() == "none":
            self.refine = None
        if self.refine == "default":  # resolved here, so a manifest names the codes it holds
            self.refine = DEFAULT_REFINE.get(self.type)
        if self.refine is not None and self.refine not in REFINE_CHOICES[1:-1]:
            raise InputError(f"refine {self.refine!r}: expected one of "
                             f"{', '.join(REFINE_CHOICES)}")
        if self.type == "binary" and self.refine is None and not self.factory:
            raise InputError("binary needs a rescoring store (refine SQ8 | SQfp16 | Flat): "
                             "Hamming distances are not inner products")
        for name in ("nlist", "pq_m", "pq_nbits", "hnsw_m", "ef_construction", "search_value",
                     "recall_at", "k_factor"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} must be >= 1, got {value}")
        if not 0 < self.target_recall <= 1:
            raise InputError(f"target_recall must be in (0, 1], got {self.target_recall}")

    def default_nlist(self, rows: int, train_rows: int) -> int:
        """~4 sqrt(rows) rounded up to a power of two, at most train_rows / 39."""
        want = 1 << max(0, math.ceil(math.log2(max(1.0, 4 * math.sqrt(rows)))))
        cap = max(1, train_rows // MIN_POINTS_PER_CENTROID)
        return max(1, min(want, 1 << int(math.log2(cap))))

    def factory_string(self, dim: int, rows: int, train_rows: int) -> str:
        if self.factory:
            return self.factory
        refine = f",Refine({self.refine})" if self.refine else ""
        if self.type == "flat":
            return "Flat"
        if self.type == "hnsw":
            return f"HNSW{self.hnsw_m},Flat"
        if self.type == "sq8":
            return "SQ8" + refine
        if self.type == "binary":
            return "LSH" + refine
        nlist = self.nlist or self.default_nlist(rows, train_rows)
        m = self.pq_m or next(m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0)
        if dim % m:
            raise InputError(f"pq_m {m} must divide the embedding dimension {dim}")
        # 2^nbits centroids per sub-quantiser want >= 39 training points each
        nbits = self.pq_nbits or max(1, min(8, int(math.log2(max(2, train_rows //
                                                                 MIN_POINTS_PER_CENTROID)))))
        return f"IVF{nlist},PQ{m}x{nbits}np{refine}"

    @property
    def rescored(self) -> bool:
        factory = self.factory or ""
        return bool(self.refine) if not factory else ("Refine" in factory or "RFlat" in factory)

    @property
    def param(self) -> str | None:
        """The search parameter chosen for the target recall (None: nothing to choose)."""
        if self.type in PARAM:
            return PARAM[self.type]
        return "k_factor" if self.type in ("sq8", "binary") and self.rescored else None

    @property
    def measures_recall(self) -> bool:
        """Every approximate type reports recall@k against exact search."""
        return self.type != "flat"

    def search_params(self, value: int | None) -> dict:
        """The manifest's ``search_params`` for a chosen nprobe / efSearch / k_factor."""
        param = self.param
        params = {param: int(value)} if param and value else {}
        if self.type == "ivfpq" and self.rescored:
            params["k_factor"] = self.k_factor
        return params

    def search_candidates(self, index: "faiss.Index") -> list[int]:
        """The search-parameter values tried when choosing one (powers of two); ``[0]``
        (meaning: no parameter) for a type with nothing to choose."""
        if self.param is None:
            return [0] if self.measures_recall else []
        if self.search_value:
            return [self.search_value]
        if self.param == "k_factor":
            return list(K_FACTORS)
        if self.type == "ivfpq":
            nlist = faiss.extract_index_ivf(index).nlist
            return sorted({min(1 << i, nlist) for i in range(int(math.log2(nlist)) + 2)})
        return [16, 32, 64, 128, 256, 512]


# --------------------------------------------------------------------------- FAISS indexes

def _split(factory: str) -> list[str]:
    """Top-level comma-separated parts of a factory string (``Refine(...)`` kept whole)."""
    parts, depth, current = [], 0, ""
    for char in factory:
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def new_index(factory: str, dim: int) -> "faiss.Index":
    """An empty inner-product index for ``factory`` (``LSH[,Refine(X)]``: sign bits, see the
    module docstring; everything else through ``faiss.index_factory``)."""
    try:
        parts = _split(factory)
        if parts[0] != "LSH":
            return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        base = faiss.IndexLSH(dim, dim, False, False)  # no rotation, thresholds 0: sign bits
        base.metric_type = faiss.METRIC_INNER_PRODUCT  # unused by LSH; IndexRefine wants it
        refine = re.fullmatch(r"Refine\((.+)\)", parts[1]) if len(parts) == 2 else None
        if len(parts) == 1:
            return base
        if refine is None:
            raise RuntimeError("LSH takes only ',Refine(X)' after it")
        store = faiss.index_factory(dim, refine.group(1), faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexRefine(base, store)
        base.this.disown()  # the IndexRefine owns and frees both
        store.this.disown()
        index.own_fields = index.own_refine_index = True
        return index
    except RuntimeError as err:
        raise InputError(f"FAISS factory string {factory!r} (dim {dim}): {err}") from err


def set_search_params(index: "faiss.Index", params: dict) -> None:
    """Apply ``{"nprobe": n}`` / ``{"efSearch": n}`` / ``{"k_factor": f}`` to an index."""
    for name, value in params.items():
        if name == "k_factor":
            refine = faiss.downcast_index(index)
            if hasattr(refine, "k_factor"):
                refine.k_factor = float(value)
        else:
            faiss.ParameterSpace().set_index_parameter(index, name, int(value))


# --------------------------------------------------------------------------- bytes per vector

@dataclass
class Footprint:
    """Bytes of a shard: ``per_vector`` x rows + ``fixed``; ``terms`` name each part."""

    per_vector: float
    fixed: float
    terms: list[str]

    def add(self, per_vector: float, fixed: float, term: str) -> "Footprint":
        self.per_vector += per_vector
        self.fixed += fixed
        self.terms.append(term)
        return self

    def shard_bytes(self, rows: int) -> float:
        return rows * self.per_vector + self.fixed


def _codes(part: str, dim: int, out: Footprint) -> Footprint:
    """A flat code store: float32, SQ, PQ or LSH (sign bits)."""
    sq = {"SQ8": (dim, 8 * dim), "SQfp16": (2 * dim, 0), "SQbf16": (2 * dim, 0),
          "SQ4": (math.ceil(dim / 2), 8 * dim), "SQ6": (math.ceil(6 * dim / 8), 8 * dim)}
    pq = re.fullmatch(r"PQ(\d+)(?:x(\d+))?(np)?", part)
    if part == "Flat":
        return out.add(4 * dim, 0, f"float32 {dim} x 4")
    if part in sq:
        return out.add(*sq[part], f"{part} {sq[part][0]}")
    if part == "LSH":
        return out.add(math.ceil(dim / 8), 0, f"sign bits {dim} / 8")
    if pq:
        m, nbits = int(pq.group(1)), int(pq.group(2) or 8)
        return out.add(math.ceil(m * nbits / 8), 2 ** nbits * dim * 4,
                       f"PQ codes {m} x {nbits} / 8")
    raise InputError(f"cannot size factory part {part!r} (known: Flat, SQ8, SQfp16, SQ4, SQ6, "
                     "PQ{m}x{nbits}, LSH, IVF{n}, HNSW{M}, Refine(X), RFlat)")


def footprint(factory: str, dim: int) -> Footprint:
    """Bytes per vector and fixed bytes per shard of the FAISS file ``factory`` writes."""
    out = Footprint(0.0, 0.0, [])
    for part in _split(factory):
        ivf = re.fullmatch(r"IVF(\d+)", part)
        hnsw = re.fullmatch(r"HNSW(\d+)", part)
        refine = re.fullmatch(r"Refine\((.+)\)", part)
        if ivf:
            nlist = int(ivf.group(1))
            out.add(8, nlist * dim * 4 + nlist * 8, "IVF id 8")
        elif hnsw:
            m = int(hnsw.group(1))
            links = 4 * (2 * m + m / (m - 1)) + 4 + 8
            out.add(links, 0, f"HNSW links 4 x (2 x {m} + {m}/{m - 1}) + 12")
        elif refine:
            inner = footprint(refine.group(1), dim)
            out.add(inner.per_vector, inner.fixed, "refine " + " + ".join(inner.terms))
        elif part == "RFlat":
            out.add(4 * dim, 0, f"refine float32 {dim} x 4")
        else:
            _codes(part, dim, out)
    return out
