"""Training throughput and memory: DeepSpeed ZeRO-3 and ZeRO-2 against plain DDP.

Trains the same model on the same batches for ``--steps`` optimizer steps with each strategy
(Ray Train, ``--workers`` workers, GPUs when the cluster has them) and prints, side by side,
samples/s (queries per second, median step after the first, which includes warm-up) and peak
memory per worker while training (CUDA max allocated on GPU; on CPU the process RSS sampled
every 10 ms from the first step on, so the transient peak of loading the checkpoint is not
counted -- that lifetime high-water mark is printed too), each also as a ratio to DDP measured
in the same run.

On CPU, peak RSS also measures the allocator: ZeRO-3 gathers and frees whole weight matrices
for every layer, and glibc's adaptive mmap threshold then serves those sizes from heap arenas
that fragment; ``--worker-env MALLOC_MMAP_THRESHOLD_=131072`` (a fixed threshold) shows the
RSS without that effect, at some speed cost. ::

    python benchmarks/train_throughput.py --model smollm2-135m --steps 6
    python benchmarks/train_throughput.py --model minilm --per-device-batch-size 8 --group-size 4
    python benchmarks/train_throughput.py --model minilm --per-device-batch-size 128 \
        --group-size 1 --grad-cache-chunk 16 --strategies zero3 ddp --steps 3 \
        --synthetic-from scifact:train --passage-max-length 64

``--grad-cache-chunk N`` measures every strategy twice, without and with GradCache (chunks of N
texts), and prints GradCache's peak memory per worker and samples/s as ratios to the same
strategy without it (the effective batch is the same: per-device batch x workers). A run that
fails -- at an effective batch of 256 on MiniLM with 128-token passages, the one without
GradCache runs out of memory on a 24 GB machine (~10 GB a worker; with 64 it holds ~7 GB) -- is
printed as FAILED with the reason, and the others still run; on a
shared machine, ``RAY_memory_usage_threshold=0.85`` makes this Ray kill its own workers before
the machine's memory runs out for everyone.

Training examples: ``--train-data`` (a training-examples file or `retriever mine` folder), or
synthetic ones built from a shared collection's judged queries (``--synthetic-from``, default
Cranfield's 225 test queries; at least 150 examples, and one per query of a step: every query
of a batch distinct, as in-batch negatives need). An effective batch of 256 (the last example
above) needs more queries than Cranfield has: SciFact's train split has 809.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STRATEGIES = ("zero3", "zero2", "ddp")


def synthetic_examples(path: Path, n: int, source: str = "cranfield",
                       negatives: int = 8) -> Path:
    """Queries = the judged queries of ``source`` (``NAME[:SPLIT]`` under the shared datasets),
    positives = their judged docs, negatives = random docs; ``n`` examples, refused (naming
    the collection) when it has fewer queries with a positive."""
    from retriever.io.formats import TrainingExample, load_dataset, write_training_examples

    name, _, split = source.partition(":")
    data = load_dataset(str(REPO.parent / "shared" / "datasets" / name), split or "test")
    rng = random.Random(0)
    passages = data.corpus.passages()
    row = {d: i for i, d in enumerate(data.corpus.ids)}
    examples = []
    for qid, text in data.judged_queries().items():
        if len(examples) == n:
            break
        positives = [passages[row[d]] for d, g in data.qrels[qid].items() if g > 0]
        if positives:
            examples.append(TrainingExample(query=text, positives=positives, query_id=qid,
                                            negatives=rng.sample(passages, negatives)))
    if len(examples) < n:
        raise SystemExit(f"--synthetic-from {source}: {len(examples)} judged queries with a "
                         f"positive, fewer than the {n} examples wanted (one per query of a "
                         "step, at least 150); pick a larger collection, e.g. scifact:train "
                         "(809 queries)")
    write_training_examples(examples, str(path))
    return path


def measure(strategy: str, args, train_data: str, root: Path, chunk: int | None = None) -> dict:
    from retriever.training.checkpoint import read_state
    from retriever.training.config import TrainConfig
    from retriever.training.run import train

    config = TrainConfig.from_dict(dict(
        train_data=train_data, model=args.model, out=str(root / f"{strategy}-{chunk}"),
        strategy=strategy, grad_cache_chunk=chunk,
        num_workers=args.workers, max_steps=args.steps,
        per_device_batch_size=args.per_device_batch_size, group_size=args.group_size,
        passage_max_length=args.passage_max_length, query_max_length=32,
        gradient_checkpointing=args.gradient_checkpointing, lora_r=16, lora_alpha=32,
        checkpoint_every=args.steps, export=False, max_failures=0, schedule="constant",
        warmup_ratio=0.0, seed=0,
        worker_env=dict(item.split("=", 1) for item in args.worker_env) or None))
    result = train(config)
    if result.error:
        raise RuntimeError(f"{strategy}: {result.error}")
    state, _ = read_state(result.checkpoint)
    history = state["history"]
    steady = [h["step_s"] for h in history[1:]] or [history[0]["step_s"]]
    queries = args.per_device_batch_size * args.workers
    return {"strategy": strategy + (f"+gc{chunk}" if chunk else ""), "base": strategy,
            "grad_cache_chunk": chunk, "samples_per_s": queries / statistics.median(steady),
            "peak_memory_mb": result.metrics["peak_memory_mb"],
            "peak_rss_lifetime_mb": result.metrics["peak_rss_lifetime_mb"],
            "params_held": result.metrics["partition"]["params_held"],
            "params_full": result.metrics["partition"]["params_full"],
            "losses": [round(h["loss"], 5) for h in history]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--train-data", default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--per-device-batch-size", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--passage-max-length", type=int, default=128)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES),
                        choices=STRATEGIES)
    parser.add_argument("--worker-env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="environment for the workers, e.g. MALLOC_MMAP_THRESHOLD_=131072")
    parser.add_argument("--grad-cache-chunk", type=int, default=None,
                        help="also measure every strategy with GradCache in chunks of N")
    parser.add_argument("--synthetic-from", default="cranfield", metavar="NAME[:SPLIT]",
                        help="shared collection (and split) the synthetic examples come from "
                             "when --train-data is not given, e.g. scifact:train")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="train-bench-") as scratch:
        root = Path(scratch)
        step = args.per_device_batch_size * args.workers  # distinct queries in one step
        train_data = args.train_data or str(synthetic_examples(
            root / "examples.jsonl", max(150, step), args.synthetic_from))
        for strategy in args.strategies:
            for chunk in (None, args.grad_cache_chunk) if args.grad_cache_chunk else (None,):
                print(f"measuring {strategy} (GradCache chunk {chunk}) ...", file=sys.stderr,
                      flush=True)
                rows.append(measured_or_failed(strategy, args, train_data, root, chunk))
    if args.grad_cache_chunk:
        print_grad_cache(rows, args)
    print_strategies([r for r in rows if not r["grad_cache_chunk"]], args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def measured_or_failed(strategy: str, args, train_data: str, root: Path,
                       chunk: int | None) -> dict:
    """:func:`measure`'s row, or one saying why the run failed (e.g. no GradCache at a batch
    whose activations do not fit: Ray's memory monitor kills the workers); printed as it
    finishes, so that a run cut short still shows it. Each run has a Ray of its own: a failed
    run's placement group would otherwise keep the next one's workers from starting."""
    import ray

    ray.init(log_to_driver=False)
    try:
        row = measure(strategy, args, train_data, root, chunk)
    except Exception as err:  # noqa: BLE001 - a failed configuration is a result too
        text = str(err)
        reason = next((line.strip() for line in text.splitlines() if "low on memory" in line),
                      None)
        # this Ray's training workers as its memory monitor listed them (not the node's
        # other processes: on a shared machine they may be someone else's)
        workers = re.findall(r"task name=RayTrainWorker[^\n]*?actual memory used=([\d.]+)GB",
                             text)
        if reason and workers:
            reason += f"; its training workers held {', '.join(workers)} GB"
        row = {"strategy": strategy + (f"+gc{chunk}" if chunk else ""), "base": strategy,
               "grad_cache_chunk": chunk,
               "failed": (f"out of memory: {reason}" if reason else
                          f"{type(err).__name__}: {text.strip().splitlines()[0][:300]}")}
        print(f"FAILED {row['strategy']}: {row['failed']}", file=sys.stderr, flush=True)
        return row
    finally:
        ray.shutdown()
    print(f"measured {row['strategy']}: {row['samples_per_s']:.2f} samples/s, train peak "
          f"MiB/worker {row['peak_memory_mb']}", file=sys.stderr, flush=True)
    return row


def _failed_line(row: dict) -> str:
    return f"{row['strategy']:<10}  FAILED: {row['failed']}"


def print_strategies(rows: list[dict], args) -> None:
    """The strategies side by side, as ratios to DDP (else the last one measured)."""
    done = [r for r in rows if "failed" not in r]
    peer = next((r for r in done if r["strategy"] == "ddp"), done[-1] if done else None)
    print(f"\nmodel {args.model}, {args.workers} workers, {args.per_device_batch_size} queries x "
          f"{args.group_size} passages per worker per step, passages <= "
          f"{args.passage_max_length} tokens, {args.steps} steps" +
          (f"; ratios against {peer['strategy']} measured in this run" if peer else ""))
    for r in rows:
        if "failed" in r:
            print(_failed_line(r))
    if not done:
        return
    header = (f"{'strategy':<8}  {'samples/s':>10}  {'x peer':>7}  "
              f"{'train peak MiB/worker':>22}  {'x peer':>7}  {'lifetime peak MiB':>18}  "
              f"{'params held per worker':>24}")
    print(header)
    print("-" * len(header))
    for r in done:
        mem = max(r["peak_memory_mb"])
        peer_mem = max(peer["peak_memory_mb"])
        print(f"{r['strategy']:<8}  {r['samples_per_s']:>10.2f}  "
              f"{r['samples_per_s'] / peer['samples_per_s']:>7.2f}  "
              f"{' / '.join(f'{m:.0f}' for m in r['peak_memory_mb']):>22}  "
              f"{mem / peer_mem:>7.2f}  "
              f"{' / '.join(f'{m:.0f}' for m in r['peak_rss_lifetime_mb']):>18}  "
              f"{' / '.join(f'{h / 1e6:.1f}M' for h in r['params_held']):>24}")
    same = all(max(abs(a - b) for a, b in zip(r["losses"], done[0]["losses"])) <= 1e-4
               for r in done)
    print(f"\nlosses per step {'agree (1e-4)' if same else 'DIFFER'} across strategies: "
          + "; ".join(f"{r['strategy']} {r['losses']}" for r in done))


def print_grad_cache(rows: list[dict], args) -> None:
    """GradCache against the same strategy without it, measured in this run (``n/a`` where
    the run without it failed)."""
    print(f"\nGradCache (chunks of {args.grad_cache_chunk} texts), effective batch "
          f"{args.per_device_batch_size * args.workers} queries x {args.group_size} passages; "
          "ratios against the same strategy without GradCache in this run (a shared, busy "
          "machine: repeat before quoting)")
    header = (f"{'strategy':<10}  {'samples/s':>10}  {'x without':>9}  "
              f"{'train peak MiB/worker':>22}  {'x without':>9}  largest loss difference")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "failed" in r:
            print(_failed_line(r))
            continue
        peer = next(p for p in rows if p["base"] == r["base"] and not p["grad_cache_chunk"])
        if "failed" in peer:
            ratios = (f"{'n/a':>9}", f"{'n/a':>9}", "n/a")
        else:
            ratios = (f"{r['samples_per_s'] / peer['samples_per_s']:>9.2f}",
                      f"{max(r['peak_memory_mb']) / max(peer['peak_memory_mb']):>9.2f}",
                      f"{max(abs(a - b) for a, b in zip(r['losses'], peer['losses'])):.2g}")
        print(f"{r['strategy']:<10}  {r['samples_per_s']:>10.2f}  {ratios[0]}  "
              f"{' / '.join(f'{m:.0f}' for m in r['peak_memory_mb']):>22}  {ratios[1]}  "
              f"{ratios[2]}")
    # Dropout is on: the run without GradCache draws its masks over the whole batch, GradCache
    # per chunk, so their losses differ by dropout noise. tests/test_train.py holds GradCache's
    # gradients to the uncached ones with the same masks (1e-5) and its losses with none.
    print("(loss difference: dropout draws differ between the two; equality is tested in "
          "tests/test_train.py)")


if __name__ == "__main__":
    sys.exit(main())
