"""Capacity planning arithmetic: encode GPU-hours, embedding and index bytes, shards, cost.

Pure functions over a typed :class:`PlanConfig`; no I/O, no Ray. ``jobs/plan.py`` is the
command-line face (``retriever plan``). Every number the plan produces is reported together
with the formula that produced it and the inputs substituted, so a reader can redo it by hand.

Default numbers and where they come from
----------------------------------------
Nothing below was measured on a GPU by this project (the development machine has none); the
tables are *stated* figures with their source, and the two knobs that matter most for encode
cost are exposed: ``--mfu`` and, better, a measured ``--docs-per-second``.

* Model sizes (:data:`MODELS`): the Hugging Face model cards / ``config.json`` of each model.
  Qwen2.5 cards state the total and the *non-embedding* parameter counts directly
  (e.g. Qwen/Qwen2.5-7B: 7.61B total, 6.53B non-embedding, 28 layers, hidden 3584). For the
  others the non-embedding count is total minus ``vocab_size x hidden`` (and minus the LM head
  when it is untied, since an embedding model drops it).
* Encode FLOPs: the forward pass of a transformer costs
  ``2 x N_nonemb + 2 x n_layers x n_ctx x d_model`` FLOPs per token (Kaplan et al. 2020,
  "Scaling Laws for Neural Language Models", Table 1). The token-embedding lookup does no
  matmul, and an embedding model has no LM head, so N is the non-embedding count.
* GPU peak (:data:`GPUS`): dense (no 2:4 sparsity) BF16 tensor-core TFLOPS from NVIDIA's
  datasheets: A100 SXM 312, H100 SXM 989, L4 121, A10 125 (AWS's A10G is an A10 variant whose
  figures NVIDIA does not publish; 125 is the A10 datasheet number and an upper bound).
* MFU (model FLOPs utilisation) 0.35: an assumption for bf16 inference of a decoder with
  token-budget batching (no padding waste, no KV cache, compute bound at these batch sizes).
  Published training MFUs for 7B-class models are ~0.4-0.55; inference encode with short
  sequences is usually below that. Replace it with a measurement: run ``retriever encode`` on
  one GPU over a sample, read docs/s from its manifest, pass ``--docs-per-second``.
* Node types and prices (:data:`NODE_TYPES`): AWS EC2 instance-type pages (vCPU, memory GiB,
  GPUs) and the EC2 On-Demand price list for us-east-1, Linux, as known to the author in
  mid-2024. They were NOT re-read for this file (the build machine has no internet access);
  AWS changes prices (it announced cuts of up to ~45% for P4/P5 in June 2025), so check
  ``aws pricing get-products`` or the pricing page and pass ``--gpu-price`` / ``--node-price``.
* Index bytes per vector: the plan builds the same :class:`retriever.index.types.IndexSpec`
  and FAISS factory string the index job builds (IVF-PQ with its SQ8 re-rank codes by default,
  sq8 with its fp16 rescoring store, binary sign bits with their SQ8 store, HNSW links, the
  IVF lists' int64 ids) and sizes it with :func:`retriever.index.types.footprint`, the
  arithmetic of FAISS' serialisation that every index manifest checks against the files it
  wrote (``bytes_per_vector``: measured next to planned). The index is float32 whatever the
  embeddings' storage dtype. The doc-id maps (parquet beside each shard) are not counted.
* Memory fraction 0.6: Ray reserves up to 30% of a node's RAM for its object store by
  default, and ~10% is left for the OS, the Python heap and query batches.
* nlist default ``4 x sqrt(N)`` rounded up to a power of two (FAISS guideline: between
  4 sqrt(N) and 16 sqrt(N) for N vectors).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from retriever.index import types as index_types

GB = 1e9
TB = 1e12
GIB = 2**30
TIB = 2**40
HOURS_PER_MONTH = 730.0  # AWS's convention for monthly prices (8760 h / 12)


@dataclass(frozen=True)
class BackboneSize:
    """Size of an encoder backbone; ``source`` says where each number was read."""

    name: str
    params: float  # total parameters
    nonemb_params: float  # parameters doing matmuls per token (no token embedding, no LM head)
    layers: int
    hidden: int  # d_model = default embedding dimension (last-token / mean pooling)
    source: str


def _qwen(size: str, params: float, nonemb: float, layers: int, hidden: int) -> BackboneSize:
    """A Qwen2.5 base model: both parameter counts as its model card states them."""
    return BackboneSize(f"qwen2.5-{size.lower()}", params, nonemb, layers, hidden,
                        f"hf.co/Qwen/Qwen2.5-{size.upper()} model card: {params / 1e9:g}B total, "
                        f"{nonemb / 1e9:g}B non-embedding")


def _smollm2(size: str, params: float, nonemb: float, layers: int, hidden: int) -> BackboneSize:
    """A SmolLM2 model: counts from its config.json (49152-token vocabulary, tied head)."""
    return BackboneSize(f"smollm2-{size.lower()}", params, nonemb, layers, hidden,
                        f"hf.co/HuggingFaceTB/SmolLM2-{size} config.json: vocab 49152 x {hidden}, "
                        "tied")


# Each row: model card / config.json on the Hugging Face Hub.
MODELS: dict[str, BackboneSize] = {
    m.name: m
    for m in [
        _qwen("0.5B", 0.49e9, 0.36e9, 24, 896),
        _qwen("1.5B", 1.54e9, 1.31e9, 28, 1536),
        _qwen("3B", 3.09e9, 2.77e9, 36, 2048),
        _qwen("7B", 7.61e9, 6.53e9, 28, 3584),
        _qwen("14B", 14.7e9, 13.1e9, 48, 5120),
        BackboneSize("mistral-7b", 7.24e9, 6.98e9, 32, 4096,
                     "hf.co/mistralai/Mistral-7B-v0.1 config.json: vocab 32000 x 4096, untied "
                     "head (e5-mistral-7b-instruct has the same backbone)"),
        BackboneSize("llama-3.1-8b", 8.03e9, 6.98e9, 32, 4096,
                     "hf.co/meta-llama/Llama-3.1-8B config.json: vocab 128256 x 4096, untied head"),
        BackboneSize("minilm", 22.7e6, 10.8e6, 6, 384,
                     "hf.co/sentence-transformers/all-MiniLM-L6-v2: 22.7M total, "
                     "vocab 30522 x 384 + 512 x 384 position embeddings"),
        _smollm2("135M", 0.135e9, 0.106e9, 30, 576),
        _smollm2("360M", 0.362e9, 0.315e9, 32, 960),
        _smollm2("1.7B", 1.71e9, 1.61e9, 24, 2048),
    ]
}


@dataclass(frozen=True)
class GpuSpec:
    name: str
    bf16_tflops: float  # dense peak, no sparsity
    memory_gib: float
    price_per_gpu_hour: float  # USD, on-demand, from the AWS node type named in `priced_as`
    priced_as: str
    source: str


@dataclass(frozen=True)
class NodeType:
    name: str
    vcpus: int
    memory_gib: float
    gpus: int
    gpu: str | None
    price_per_hour: float  # USD, AWS on-demand, us-east-1, Linux
    source: str = "AWS EC2 instance page + On-Demand price list us-east-1 (author's mid-2024 figures)"


# AWS EC2. Memory in GiB as AWS states it; prices: see the module docstring (not re-fetched).
NODE_TYPES: dict[str, NodeType] = {
    n.name: n
    for n in [
        NodeType("r7i.8xlarge", 32, 256, 0, None, 2.1168),
        NodeType("r7i.16xlarge", 64, 512, 0, None, 4.2336),
        NodeType("r7i.48xlarge", 192, 1536, 0, None, 12.7008),
        NodeType("x2idn.32xlarge", 128, 2048, 0, None, 13.338),
        NodeType("x2iedn.32xlarge", 128, 4096, 0, None, 26.676),
        NodeType("m7i.2xlarge", 8, 32, 0, None, 0.4032),
        NodeType("g5.xlarge", 4, 16, 1, "a10g", 1.006),
        NodeType("g5.2xlarge", 8, 32, 1, "a10g", 1.212),
        NodeType("g5.48xlarge", 192, 768, 8, "a10g", 16.288),
        NodeType("g6.xlarge", 4, 16, 1, "l4", 0.8048),
        NodeType("p4d.24xlarge", 96, 1152, 8, "a100", 32.7726),
        NodeType("p5.48xlarge", 192, 2048, 8, "h100", 98.32,
                 "AWS p5 page; price before the June 2025 P5 price cut (author's mid-2024 figure)"),
    ]
}


def _per_gpu(node: str) -> float:
    n = NODE_TYPES[node]
    return n.price_per_hour / n.gpus


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in [
        GpuSpec("a100", 312.0, 40, _per_gpu("p4d.24xlarge"), "p4d.24xlarge / 8",
                "NVIDIA A100 datasheet: BF16 tensor 312 TFLOPS dense (624 with sparsity)"),
        GpuSpec("h100", 989.0, 80, _per_gpu("p5.48xlarge"), "p5.48xlarge / 8",
                "NVIDIA H100 SXM datasheet: BF16 tensor 1979 TFLOPS with sparsity = 989 dense"),
        GpuSpec("a10g", 125.0, 24, _per_gpu("g5.xlarge"), "g5.xlarge",
                "NVIDIA A10 datasheet: BF16 tensor 125 TFLOPS dense (A10G unpublished; upper bound)"),
        GpuSpec("l4", 121.0, 24, _per_gpu("g6.xlarge"), "g6.xlarge",
                "NVIDIA L4 datasheet: BF16 tensor 242 TFLOPS with sparsity = 121 dense"),
    ]
}

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2,
                               "int8": 1, "binary": 0}  # binary handled as d/8 below
INDEX_TYPES = index_types.TYPES
DEFAULT_MFU = 0.35
DEFAULT_MEMORY_FRACTION = 0.6
DEFAULT_AVG_TOKENS = 256  # a passage truncated at 512 tokens averages well below it


def _help(text: str, **more: Any) -> Any:
    """Field metadata: the option's help text (``retriever plan --help``) and more keys."""
    return {"help": text, **more}


@dataclass
class PlanConfig:
    """Everything the plan depends on. ``None`` means "take it from the tables".

    Counts (``docs``, ``params``) may be given as text (``1e9``, ``8.8M``, ``500k``, see
    :func:`parse_count`); ``model`` ``none``/``custom`` means none (then give params and dims)."""

    docs: float | str = field(metadata=_help("number of documents (1e9, 8.8M, 500k)"))
    model: str | None = field(default="qwen2.5-7b", metadata=_help(
        "backbone from the table; 'none' with --params/--dims"))
    params: float | str | None = field(default=None, metadata=_help(
        "non-embedding parameter count (overrides the model's), e.g. 6.53e9"))
    dims: int | None = field(default=None, metadata=_help(
        "embedding dimension (default: hidden size)"))
    avg_tokens: float = field(default=DEFAULT_AVG_TOKENS, metadata=_help(
        "mean tokens per document after truncation"))
    dtype: str = field(default="fp16", metadata=_help(
        "embedding storage dtype", choices=sorted(DTYPE_BYTES)))
    index: str = field(default="ivfpq", metadata=_help("index type", choices=INDEX_TYPES))
    pq_m: int | None = field(default=None, metadata=_help(
        "IVF-PQ sub-quantisers; must divide dims (default: the index job's, ~dims/8)"))
    pq_nbits: int | None = field(default=None, metadata=_help(
        "IVF-PQ bits per code (default: the index job's, 8 with a large enough sample)"))
    nlist: int | None = field(default=None, metadata=_help(
        "IVF lists (default next_pow2(4 sqrt N), at most train_sample / 39)"))
    refine: str = field(default="default", metadata=_help(
        "rescoring codes of ivfpq / sq8 / binary (default: the type's own, as the index job)",
        choices=list(index_types.REFINE_CHOICES)))
    train_sample: float | str | None = field(default=None, metadata=_help(
        "IVF training sample (default: 39 x nlist, enough for the default nlist)"))
    nprobe: int = field(default=64, metadata=_help("IVF lists searched per query"))
    hnsw_m: int = field(default=32, metadata=_help("HNSW neighbours per node"))
    node_type: str = field(default="r7i.16xlarge", metadata=_help(
        "node type holding index shards"))
    node_memory_gib: float | None = field(default=None, metadata=_help("override node memory"))
    node_price: float | None = field(default=None, metadata=_help("override node USD/hour"))
    memory_fraction: float = field(default=DEFAULT_MEMORY_FRACTION, metadata=_help(
        "share of node RAM for the index"))
    gpu: str = field(default="a100", metadata=_help("encode GPU"))
    gpu_price: float | None = field(default=None, metadata=_help("USD per GPU-hour override"))
    mfu: float = field(default=DEFAULT_MFU, metadata=_help(
        "model FLOPs utilisation for the FLOPs estimate"))
    docs_per_second: float | None = field(default=None, metadata=_help(
        "measured encode throughput per GPU; replaces the FLOPs estimate"))
    encode_gpus: int = field(default=8, metadata=_help("GPUs encoding in parallel"))
    idle_timeout_minutes: float = field(default=10.0, metadata=_help(
        "autoscaler idle timeout: how long a node outlives its last work (cluster/aws.yaml: 10)"))
    replicas: int = field(default=1, metadata=_help("replicas of each index shard"))

    def __post_init__(self) -> None:
        self.normalise()
        self.check()

    def normalise(self) -> None:
        """Counts given as text to numbers, names to lower case, model ``none`` to None."""
        self.docs = _count("docs", self.docs)
        self.params = None if self.params is None else _count("params", self.params)
        self.train_sample = (None if self.train_sample is None
                             else _count("train_sample", self.train_sample))
        model = None if self.model is None else str(self.model).lower()
        self.model = None if model in (None, "none", "custom", "") else model
        self.gpu = str(self.gpu).lower()

    def check(self) -> None:
        """Raises ValueError for values no plan can be made from."""
        if self.docs <= 0:
            raise ValueError("docs must be > 0")
        if self.model is not None and self.model not in MODELS and self.params is None:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(MODELS)} "
                             "(or pass params and dims)")
        if self.model is None and (self.params is None or self.dims is None):
            raise ValueError("without a known model, give both params and dims")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}")
        if self.index not in INDEX_TYPES:
            raise ValueError(f"index must be one of {', '.join(INDEX_TYPES)}")
        if self.gpu not in GPUS and (self.gpu_price is None or self.docs_per_second is None):
            raise ValueError(f"unknown gpu {self.gpu!r}; known: {', '.join(GPUS)} "
                             "(or pass gpu_price and docs_per_second)")
        if self.node_type not in NODE_TYPES and (self.node_memory_gib is None
                                                 or self.node_price is None):
            raise ValueError(f"unknown node type {self.node_type!r}; known: "
                             f"{', '.join(NODE_TYPES)} (or pass node memory and price)")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError("memory_fraction must be in (0, 1]")
        if not 0 < self.mfu <= 1:
            raise ValueError("mfu must be in (0, 1]")
        if self.index == "ivfpq" and self.pq_m and self.dimensions % self.pq_m:
            raise ValueError(f"pq_m={self.pq_m} must divide dims={self.dimensions}")
        if self.replicas < 1 or self.encode_gpus < 1:
            raise ValueError("replicas and encode_gpus must be >= 1")

    def index_spec(self) -> index_types.IndexSpec:
        """The index job's spec for these settings (``retriever index`` builds the same)."""
        try:
            return index_types.IndexSpec(type=self.index, nlist=self.nlist, pq_m=self.pq_m,
                                         pq_nbits=self.pq_nbits, refine=self.refine,
                                         hnsw_m=self.hnsw_m)
        except Exception as err:  # InputError: the same message the index job gives
            raise ValueError(str(err)) from None

    @property
    def model_spec(self) -> BackboneSize | None:
        return MODELS.get(self.model) if self.model else None

    @property
    def dimensions(self) -> int:
        if self.dims is not None:
            return int(self.dims)
        assert self.model_spec is not None
        return self.model_spec.hidden


@dataclass
class Step:
    """One line of the plan: a named quantity, its formula, and the formula with numbers in."""

    name: str
    value: float
    unit: str
    formula: str
    substituted: str
    note: str = ""


@dataclass
class Plan:
    config: PlanConfig
    steps: list[Step] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    def add(self, name: str, value: float, unit: str, formula: str, substituted: str,
            note: str = "") -> float:
        self.steps.append(Step(name, value, unit, formula, substituted, note))
        return value

    def __getitem__(self, name: str) -> float:
        for step in self.steps:
            if step.name == name:
                return step.value
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "results": {s.name: s.value for s in self.steps},
            "steps": [dataclasses.asdict(s) for s in self.steps],
            "assumptions": self.assumptions,
        }


def num(x: float) -> str:
    """A compact number for formulas: integers as-is up to 1e6, else 4 significant digits."""
    if float(x).is_integer() and abs(x) < 1e7:
        return str(int(x))
    return f"{x:.4g}"


def human_bytes(n: float) -> str:
    """Decimal and binary units side by side: ``7.17 TB (6.52 TiB)``."""
    for unit, size, bunit, bsize in (("TB", TB, "TiB", TIB), ("GB", GB, "GiB", GIB)):
        if n >= size:
            return f"{n / size:.2f} {unit} ({n / bsize:.2f} {bunit})"
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB ({n / 2**20:.2f} MiB)"
    return f"{num(n)} B"


def _count(key: str, value: str | float | int) -> float:
    """:func:`parse_count`, its error naming the option ``key``."""
    try:
        return parse_count(value)
    except ValueError:
        raise ValueError(f"{key}: {value!r} is not a count (1e9, 8.8M, 500k)") from None


def parse_count(text: str | float | int) -> float:
    """``1e9``, ``1_000_000``, ``8.8M``, ``1B``, ``500k`` -> float."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().replace("_", "").replace(",", "")
    mult = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    if s and s[-1].lower() in mult:
        return float(s[:-1]) * mult[s[-1].lower()]
    return float(s)


def throughput_from_manifest(manifest: dict, url: str) -> tuple[float, str]:
    """Docs/s per encode worker measured by ``retriever encode``, from its manifest's
    ``encode.last_run`` (docs, seconds, start-up included; ``resources``: "N actor(s) x
    (G GPU, ...)" or "(C CPU, ...)"): per GPU when the actors held GPUs, else per actor.
    Returns (docs/s per worker, a sentence saying where it came from)."""
    run = (manifest.get("encode") or {}).get("last_run") or {}
    docs, seconds = run.get("docs") or 0, run.get("seconds") or 0
    if not docs or not seconds:
        raise ValueError(f"{url}: the encode manifest records no measured run "
                         "(encode.last_run.docs / seconds; a run that reused every shard "
                         "measures nothing): re-run encode, or pass --docs-per-second")
    match = re.match(r"(\d+) actor\(s\) x \(([\d.]+) (GPU|CPU)", str(run.get("resources")))
    if match is None:
        raise ValueError(f"{url}: cannot read the encode workers from "
                         f"encode.last_run.resources {run.get('resources')!r}")
    actors, share, kind = int(match.group(1)), float(match.group(2)), match.group(3)
    workers = actors * share if kind == "GPU" else actors
    per_worker = docs / seconds / workers
    unit = "GPU" if kind == "GPU" else "CPU actor"
    return per_worker, (f"encode throughput from {url}: {docs} docs in {seconds:g} s on "
                        f"{run['resources']} = {num(per_worker)} docs/s per {unit}")


def plan(cfg: PlanConfig) -> Plan:
    """Every quantity of the plan, in order: encode, embeddings, index, shards, search."""
    p = Plan(cfg)
    _plan_encode(p, cfg)
    _plan_node_hours(p, cfg)
    bytes_per_dim = _plan_embeddings(p, cfg)
    per_vec, fixed = _plan_index(p, cfg, bytes_per_dim)
    shards = _plan_shards(p, cfg, per_vec, fixed)
    _plan_search(p, cfg, shards, bytes_per_dim)
    return p


def _plan_encode(p: Plan, cfg: PlanConfig) -> None:
    """Encode throughput per GPU, GPU-hours, wall-clock hours and cost."""
    N = float(cfg.docs)
    gpu = GPUS.get(cfg.gpu)
    gpu_price = cfg.gpu_price if cfg.gpu_price is not None else gpu.price_per_gpu_hour  # type: ignore[union-attr]
    if cfg.docs_per_second is not None:
        dps = float(cfg.docs_per_second)
        p.assumptions.append(f"encode throughput measured/stated: {num(dps)} docs/s per GPU")
    else:
        dps = _plan_docs_per_second(p, cfg, gpu)
    gpu_hours = p.add("encode_gpu_hours", N / dps / 3600, "GPU-h",
                      "docs / docs_per_second_per_gpu / 3600", f"{num(N)} / {num(dps)} / 3600")
    p.add("encode_wall_hours", gpu_hours / cfg.encode_gpus, "h", "encode_gpu_hours / encode_gpus",
          f"{num(gpu_hours)} / {cfg.encode_gpus}")
    p.add("encode_cost_usd", gpu_hours * gpu_price, "USD", "encode_gpu_hours x price_per_gpu_hour",
          f"{num(gpu_hours)} x {gpu_price:.4g}",
          note=(f"priced as {gpu.priced_as} on-demand" if gpu and cfg.gpu_price is None
                else "price given"))


# The GPU groups of cluster/aws.yaml (min_workers 0: launched for a job, gone after the idle
# timeout); another GPU runs on the first node type that has it.
AUTOSCALED_GPU_GROUPS = {"a10g": ("worker.gpu.1x", "g5.2xlarge"),
                         "a100": ("worker.gpu.8x", "p4d.24xlarge")}


def _plan_node_hours(p: Plan, cfg: PlanConfig) -> None:
    """Node-hours of the autoscaled GPU group for the encode job: its nodes are launched from
    zero for the job, all busy for the encode's wall-clock hours, then idle until the
    autoscaler's idle timeout terminates them (that idle time is billed too)."""
    group, node_name = AUTOSCALED_GPU_GROUPS.get(cfg.gpu, (None, None))
    node = NODE_TYPES.get(node_name or "") or next(
        (n for n in NODE_TYPES.values() if n.gpu == cfg.gpu), None)
    if node is None:
        return
    nodes = p.add("encode_nodes", math.ceil(cfg.encode_gpus / node.gpus), "nodes",
                  "ceil(encode_gpus / gpus_per_node)",
                  f"ceil({cfg.encode_gpus} / {node.gpus})  ({node.name}"
                  + (f", group {group}" if group else ", in no cluster/aws.yaml group") + ")")
    idle_h = cfg.idle_timeout_minutes / 60
    hours = p.add("encode_node_hours", nodes * (p["encode_wall_hours"] + idle_h), "node-h",
                  "encode_nodes x (encode_wall_hours + idle_timeout_minutes / 60)",
                  f"{num(nodes)} x ({num(p['encode_wall_hours'])} + "
                  f"{num(cfg.idle_timeout_minutes)} / 60)",
                  note="autoscaled from 0 and back; the idle timeout is billed")
    p.add("encode_node_cost_usd", hours * node.price_per_hour, "USD",
          "encode_node_hours x node_price_per_hour", f"{num(hours)} x {node.price_per_hour:.4g}",
          note=f"{node.name} on-demand (the whole node, CPUs and idle time included)")


def _plan_docs_per_second(p: Plan, cfg: PlanConfig, gpu: GpuSpec | None) -> float:
    """Docs/s per GPU estimated from the forward-pass FLOPs and an assumed MFU."""
    assert gpu is not None
    spec = cfg.model_spec
    T = float(cfg.avg_tokens)
    n_params = cfg.params if cfg.params is not None else spec.nonemb_params  # type: ignore[union-attr]
    layers = spec.layers if spec else 0
    hidden = spec.hidden if spec else cfg.dimensions
    fpt = p.add(
        "flops_per_token", 2 * n_params + 2 * layers * T * hidden, "FLOP",
        "2 x N_nonemb + 2 x n_layers x n_ctx x d_model  (Kaplan et al. 2020, forward pass)",
        f"2 x {num(n_params)} + 2 x {layers} x {num(T)} x {hidden}",
    )
    flops_doc = p.add("flops_per_doc", fpt * T, "FLOP", "flops_per_token x avg_tokens",
                      f"{num(fpt)} x {num(T)}")
    eff = p.add("effective_flops_per_gpu", gpu.bf16_tflops * 1e12 * cfg.mfu, "FLOP/s",
                "peak_bf16 x MFU", f"{num(gpu.bf16_tflops)}e12 x {cfg.mfu}",
                note=f"{gpu.name}: {gpu.source}")
    dps = p.add("docs_per_second_per_gpu", eff / flops_doc, "docs/s",
                "effective_flops_per_gpu / flops_per_doc", f"{num(eff)} / {num(flops_doc)}")
    p.assumptions.append(f"MFU {cfg.mfu} (assumed, not measured; pass --docs-per-second "
                         "with a measurement to replace the FLOPs estimate)")
    return dps


def _plan_embeddings(p: Plan, cfg: PlanConfig) -> float:
    """Bytes of the stored embeddings; returns the bytes per dimension of ``cfg.dtype``."""
    N, d = float(cfg.docs), cfg.dimensions
    bpd = DTYPE_BYTES[cfg.dtype] if cfg.dtype != "binary" else 1 / 8
    p.add("embedding_bytes", N * d * bpd, "B", "docs x dims x bytes_per_dim",
          f"{num(N)} x {d} x {num(bpd)}  ({cfg.dtype})")
    return bpd


def _plan_index(p: Plan, cfg: PlanConfig, bpd: float) -> tuple[float, float]:
    """Index bytes per vector and the fixed bytes every shard holds (trained structures), from
    the factory string the index job builds for the same settings; returns both."""
    N, d = float(cfg.docs), cfg.dimensions
    spec = cfg.index_spec()
    nlist = cfg.nlist or spec.default_nlist(N, int(cfg.train_sample or N))
    if cfg.index == "ivfpq":
        p.add("nlist", nlist, "", "given" if cfg.nlist else "next_pow2(4 x sqrt(docs))",
              str(nlist) if cfg.nlist else f"next_pow2(4 x sqrt({num(N)}))")
    train_rows = int(cfg.train_sample or nlist * index_types.MIN_POINTS_PER_CENTROID)
    try:
        factory = spec.factory_string(d, int(N), train_rows)
        size = index_types.footprint(factory, d)
    except Exception as err:  # InputError: the index job's own message
        raise ValueError(str(err)) from None
    trained = f"; IVF trained on {num(train_rows)} vectors" if "IVF" in factory else ""
    p.assumptions.append(f"index: FAISS {factory!r} (what `retriever index --type {cfg.index}` "
                         f"builds{trained}), float32 vectors")
    terms = " + ".join(size.terms)
    per_vec = p.add("index_bytes_per_vector", size.per_vector, "B",
                    f"bytes per vector of {factory} (retriever.index.types.footprint)", terms)
    fixed = p.add("index_fixed_bytes_per_shard", size.fixed, "B",
                  "trained structures per shard (coarse centroids + list sizes, PQ codebooks, "
                  "SQ ranges)", f"{num(size.fixed)}")
    p.add("index_vector_bytes", N * per_vec, "B", "docs x index_bytes_per_vector",
          f"{num(N)} x {num(per_vec)}")
    return per_vec, fixed


def _plan_shards(p: Plan, cfg: PlanConfig, per_vec: float, fixed: float) -> float:
    """How many shards of the node type's memory the index needs; returns the count."""
    N = float(cfg.docs)
    node = NODE_TYPES.get(cfg.node_type)
    mem_gib = cfg.node_memory_gib if cfg.node_memory_gib is not None else node.memory_gib  # type: ignore[union-attr]
    cap = p.add("shard_capacity_bytes", mem_gib * GIB * cfg.memory_fraction, "B",
                "node_memory_GiB x 2^30 x memory_fraction",
                f"{num(mem_gib)} x 2^30 x {cfg.memory_fraction}",
                note=f"node type {cfg.node_type}")
    if cap <= fixed + per_vec:
        raise ValueError(f"a {cfg.node_type} shard ({human_bytes(cap)}) cannot hold the fixed "
                         f"per-shard structures ({human_bytes(fixed)}); choose a larger node "
                         "or a smaller nlist")
    vps = p.add("vectors_per_shard_max", math.floor((cap - fixed) / per_vec), "",
                "floor((shard_capacity_bytes - index_fixed_bytes_per_shard) / index_bytes_per_vector)",
                f"floor(({num(cap)} - {num(fixed)}) / {num(per_vec)})")
    shards = p.add("shards", math.ceil(N / vps), "", "ceil(docs / vectors_per_shard_max)",
                   f"ceil({num(N)} / {num(vps)})")
    p.add("index_bytes_per_shard", math.ceil(N / shards) * per_vec + fixed, "B",
          "ceil(docs / shards) x index_bytes_per_vector + index_fixed_bytes_per_shard",
          f"ceil({num(N)} / {num(shards)}) x {num(per_vec)} + {num(fixed)}")
    total_vec = p["index_vector_bytes"]
    p.add("index_bytes_total", total_vec + shards * fixed, "B",
          "index_vector_bytes + shards x index_fixed_bytes_per_shard",
          f"{num(total_vec)} + {num(shards)} x {num(fixed)}")
    return shards


def _plan_search(p: Plan, cfg: PlanConfig, shards: float, bpd: float) -> None:
    """Per-query fan-out and scan work, search nodes and their cost; the plan's assumptions."""
    N = float(cfg.docs)
    node = NODE_TYPES.get(cfg.node_type)
    price = cfg.node_price if cfg.node_price is not None else node.price_per_hour  # type: ignore[union-attr]
    p.add("search_fanout", shards, "shards/query", "shards (every query visits every shard)",
          f"{num(shards)}")
    if cfg.index == "ivfpq":
        nlist = p["nlist"]
        p.add("codes_scanned_per_shard_per_query", math.ceil(N / shards) * cfg.nprobe / nlist, "",
              "ceil(docs / shards) x nprobe / nlist",
              f"ceil({num(N)} / {num(shards)}) x {cfg.nprobe} / {num(nlist)}")
    elif cfg.index == "flat":
        per_vec = p["index_bytes_per_vector"]
        p.add("bytes_scanned_per_shard_per_query", math.ceil(N / shards) * per_vec, "B",
              "ceil(docs / shards) x index_bytes_per_vector (brute force)",
              f"ceil({num(N)} / {num(shards)}) x {num(per_vec)}")
    nodes = p.add("search_nodes", shards * cfg.replicas, "", "shards x replicas",
                  f"{num(shards)} x {cfg.replicas}")
    p.add("search_cost_usd_per_hour", nodes * price, "USD/h", "search_nodes x node_price_per_hour",
          f"{num(nodes)} x {price:.4g}")
    p.add("search_cost_usd_per_month", nodes * price * HOURS_PER_MONTH, "USD/month",
          "search_nodes x node_price_per_hour x 730", f"{num(nodes)} x {price:.4g} x 730")
    p.assumptions.append(f"memory fraction {cfg.memory_fraction} of node RAM for the index "
                         "(Ray object store default 30%, ~10% OS/heap headroom)")
    p.assumptions.append("prices: AWS on-demand us-east-1 (author's mid-2024 figures, not "
                         "re-fetched); pass --gpu-price / --node-price for current ones")


def format_plan(p: Plan) -> str:
    """The human-readable plan: one block per quantity with its formula and numbers."""
    cfg = p.config
    spec = cfg.model_spec
    lines = [
        f"capacity plan: {num(cfg.docs)} docs x {cfg.dimensions} dims ({cfg.dtype}), "
        f"model {cfg.model or 'custom'}"
        + (f" ({num(spec.params)} params, {num(spec.nonemb_params)} non-embedding)" if spec else "")
        + f", index {cfg.index}, shard node {cfg.node_type}, encode gpu {cfg.gpu}",
        "",
    ]
    for s in p.steps:
        if s.unit == "B":
            hb = human_bytes(s.value)
            shown = hb if hb.endswith(" B") else f"{num(s.value)} B = {hb}"
        elif s.unit in ("USD", "USD/h", "USD/month"):
            shown = f"${s.value:,.2f}" + ("" if s.unit == "USD" else s.unit[3:])
        else:
            shown = f"{num(s.value)} {s.unit}".rstrip()
        lines.append(f"{s.name} = {s.formula}")
        lines.append(f"    = {s.substituted}")
        lines.append(f"    = {shown}" + (f"   [{s.note}]" if s.note else ""))
    lines.append("")
    lines.append("summary:")
    lines.append(f"  embeddings      {human_bytes(p['embedding_bytes'])}")
    shards = p["shards"]
    lines.append(f"  index           {human_bytes(p['index_bytes_total'])} in {num(shards)} "
                 f"shard{'' if shards == 1 else 's'} of {human_bytes(p['index_bytes_per_shard'])}")
    gh = p["encode_gpu_hours"]
    lines.append(f"  encode          {gh:,.{0 if gh >= 100 else 2}f} GPU-hours "
                 f"(${p['encode_cost_usd']:,.2f}; {p['encode_wall_hours']:,.2f} h on "
                 f"{cfg.encode_gpus} GPUs)")
    lines.append(f"  search          fan-out {num(p['search_fanout'])}, {num(p['search_nodes'])} "
                 f"x {cfg.node_type}, ${p['search_cost_usd_per_month']:,.0f}/month")
    lines.append("")
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in p.assumptions]
    return "\n".join(lines)
