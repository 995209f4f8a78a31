"""``retriever plan``: a capacity plan for encoding and serving a corpus at scale.

    retriever plan --docs 1e9 --model qwen2.5-7b --dims 3584 --index ivfpq --pq-m 64 \\
        --node-type r7i.16xlarge --gpu a100

prints encode GPU-hours and cost, embedding bytes, index bytes per shard, the number of shards
that fit the chosen node's memory, the search fan-out and the serving cost, each with its
formula and the numbers substituted. ``--json`` prints the same as JSON. ``--from-manifest URL``
takes the encode throughput measured by ``retriever encode`` (its embedding folder's manifest)
instead of a stated ``--docs-per-second``; the index bytes come from the factory string
``retriever index`` builds for the same settings (``retriever.index.types``). The options are
:class:`retriever.ops.capacity.PlanConfig`'s (also from ``--config FILE``); the arithmetic and
the sources of every default number live in :mod:`retriever.ops.capacity`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field

from retriever import config as cfg
from retriever.io import store
from retriever.ops import capacity as cap

PROG = "retriever plan"


@dataclass
class PlanJobConfig(cap.PlanConfig):
    json: bool = field(default=False, metadata={"help": "print the plan as JSON"})
    from_manifest: str | None = field(default=None, metadata={
        "help": "an encode manifest (embedding folder URL or its manifest.json): its measured "
                "docs/s per GPU (or CPU actor) replaces --docs-per-second"})

    def __post_init__(self) -> None:
        # Only the counts are read while parsing (an error names its key); whether a plan can
        # be made from the values is checked by the plan itself, as `retriever plan: <why>`.
        self.normalise()

    def plan_config(self) -> tuple[cap.PlanConfig, str | None]:
        """The plan's own (checked) config, with the throughput read from ``from_manifest``
        when given, and the sentence saying where it came from (None: stated, not read)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(cap.PlanConfig)}
        source = None
        if self.from_manifest:
            url = self.from_manifest
            if not url.endswith(".json"):
                url = store.join(url, "manifest.json")
            if not store.exists(url):
                raise ValueError(f"{url}: no encode manifest there")
            values["docs_per_second"], source = cap.throughput_from_manifest(
                store.read_json(url), url)
        return cap.PlanConfig(**values), source


PlanJobConfig.__doc__ = (  # the --help description, with the tables' names
    "Capacity plan: encode GPU-hours, embedding/index bytes, shards, fan-out, cost. "
    "Known models: " + ", ".join(cap.MODELS) + ". GPUs: " + ", ".join(cap.GPUS)
    + ". Node types: " + ", ".join(cap.NODE_TYPES)
    + ". Sources of every default: retriever/ops/capacity.py.")


def main(argv: list[str] | None = None) -> int:
    config = cfg.parse(PlanJobConfig, argv, prog=PROG)
    try:
        plan_config, throughput_source = config.plan_config()
        result = cap.plan(plan_config)
        if throughput_source:
            result.assumptions.append(throughput_source)
    except ValueError as exc:  # e.g. an unknown model, or a shard larger than its node
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if config.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(cap.format_plan(result))
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["plan", *sys.argv[1:]]))
