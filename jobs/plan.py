"""``retriever plan``: a capacity plan for encoding and serving a corpus at scale.

    retriever plan --docs 1e9 --model qwen2.5-7b --dims 3584 --index ivfpq --pq-m 64 \\
        --node-type r7i.16xlarge --gpu a100

prints encode GPU-hours and cost, embedding bytes, index bytes per shard, the number of shards
that fit the chosen node's memory, the search fan-out and the serving cost, each with its
formula and the numbers substituted. ``--json`` prints the same as JSON. The options are
:class:`retriever.ops.capacity.PlanConfig`'s (also from ``--config FILE``); the arithmetic and
the sources of every default number live in :mod:`retriever.ops.capacity`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field

from retriever import config as cfg
from retriever.ops import capacity as cap

PROG = "retriever plan"


@dataclass
class PlanJobConfig(cap.PlanConfig):
    json: bool = field(default=False, metadata={"help": "print the plan as JSON"})

    def __post_init__(self) -> None:
        # Only the counts are read while parsing (an error names its key); whether a plan can
        # be made from the values is checked by the plan itself, as `retriever plan: <why>`.
        self.normalise()

    def plan_config(self) -> cap.PlanConfig:
        """The plan's own (checked) config: without the output switch, no input of the plan."""
        return cap.PlanConfig(**{f.name: getattr(self, f.name)
                                 for f in dataclasses.fields(cap.PlanConfig)})


PlanJobConfig.__doc__ = (  # the --help description, with the tables' names
    "Capacity plan: encode GPU-hours, embedding/index bytes, shards, fan-out, cost. "
    "Known models: " + ", ".join(cap.MODELS) + ". GPUs: " + ", ".join(cap.GPUS)
    + ". Node types: " + ", ".join(cap.NODE_TYPES)
    + ". Sources of every default: retriever/ops/capacity.py.")


def main(argv: list[str] | None = None) -> int:
    config = cfg.parse(PlanJobConfig, argv, prog=PROG)
    try:
        result = cap.plan(config.plan_config())
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
