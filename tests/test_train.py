"""Training mechanics on Ray Train with a tiny random BERT (2 workers, CPU, gloo).

One 10-step run per strategy (ZeRO-3, ZeRO-2, DDP) with the same seed and data (2 workers x
2 queries x 2 accumulation steps, gradient checkpointing on) is shared by the tests below; a
constant learning rate makes a run's first steps independent of its length, so a longer run
(the fault test) must reproduce the 10-step run's losses exactly, also across the restart from
its checkpoint.

GradCache: one worker group probes ZeRO-3, ZeRO-2 and DDP in turn (LoRA dropout on), comparing
GradCache's LoRA gradients with the plain graph's on the same batch; a 5-step GradCache run
must have the plain run's losses. Matryoshka: a short run's 8-dim prefix must retrieve better
than the untrained model's.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from retriever.training.config import TrainConfig
from tests.train_fixtures import examples_file, tiny_bert, tiny_llama

LOSS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"root": root, "model": str(tiny_bert(root / "tiny-bert")),
            "examples": str(examples_file(root / "examples.jsonl"))}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def mechanics_config(assets, strategy: str, out: str, **overrides) -> TrainConfig:
    settings = dict(train_data=assets["examples"], model=assets["model"], out=out,
                    strategy=strategy, num_workers=2, max_steps=10, per_device_batch_size=2,
                    gradient_accumulation_steps=2, group_size=4, lora_r=4, lora_alpha=8,
                    lora_dropout=0.0, gradient_checkpointing=True, learning_rate=1e-3,
                    schedule="constant", warmup_ratio=0.0, temperature=0.05, checkpoint_every=5,
                    zero3_persistence_threshold=0, max_failures=0, seed=0)
    settings.update(overrides)
    return TrainConfig.from_dict(settings)


@pytest.fixture(scope="module")
def runs(assets, ray_local):
    """Train once per strategy, on demand, shared by the tests of this module."""
    from retriever.training.run import train

    cache = {}

    def get(strategy: str):
        if strategy not in cache:
            out = str(assets["root"] / f"run-{strategy}")
            cache[strategy] = train(mechanics_config(assets, strategy, out))
        return cache[strategy]

    return get


def losses(result) -> list[float]:
    rows = [json.loads(line) for line in
            Path(result.out, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def adapter_tensors(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(result.out, "adapter", "adapter_model.safetensors")))


def test_zero3_partitions_parameters_across_two_workers(runs):
    result = runs("zero3")
    assert result.error is None
    part = result.manifest["partition"]
    full, held = part["params_full"], part["params_held"]
    assert len(held) == 2 and full > 1_000_000
    # Each worker holds about half of every parameter (ZeRO-3 pads partitions slightly) ...
    for share in held:
        assert full / 2 <= share <= full / 2 + 2 * 1024
    # ... and none is materialised outside a forward pass.
    assert part["params_materialized"] == [0, 0]
    assert result.manifest["strategy"] == "zero3" and result.manifest["world_size"] == 2


def test_zero3_zero2_ddp_give_the_same_losses(runs):
    reference = runs("zero3")
    ref_losses = losses(reference)
    assert len(ref_losses) == 10
    ref_adapter = adapter_tensors(reference)
    # The LoRA weights moved (lora_B starts at zero), so equal losses are not trivial.
    assert max(float(t.abs().max()) for k, t in ref_adapter.items() if "lora_B" in k) > 1e-3
    for strategy in ("zero2", "ddp"):
        result = runs(strategy)
        assert result.error is None
        other = losses(result)
        assert np.allclose(other, ref_losses, rtol=0, atol=LOSS_TOLERANCE), (strategy, other,
                                                                            ref_losses)
        tensors = adapter_tensors(result)
        assert tensors.keys() == ref_adapter.keys()
        for key, value in ref_adapter.items():
            assert torch.allclose(tensors[key], value, atol=1e-4), (strategy, key)
        part = result.manifest["partition"]
        assert part["params_held"] == [part["params_full"]] * 2  # no parameter partitioning


def test_exports_load_as_models_for_eval(runs, assets, tmp_path):
    from jobs import eval as eval_job
    from retriever.modeling.encoder import Encoder, EncoderConfig
    from retriever.modeling.registry import resolve_model

    out = Path(runs("zero3").out)
    adapter, merged = out / "adapter", out / "merged"
    for name in ("adapter_config.json", "adapter_model.safetensors", "retriever.json"):
        assert (adapter / name).exists()
    assert (merged / "model.safetensors").exists() and (merged / "retriever.json").exists()
    resolved = resolve_model(str(adapter))
    assert resolved.adapter_path == str(adapter) and resolved.path == assets["model"]
    assert resolved.defaults.query_max_length == 32  # the settings it was trained with

    texts = ["shock wave boundary layer", "heat transfer cone nozzle"]
    vectors = {}
    for name, model in (("adapter", adapter), ("merged", merged), ("base", assets["model"])):
        vectors[name] = Encoder(EncoderConfig(model=str(model), dtype="float32")).encode(
            texts, "passage")
    assert np.allclose(vectors["adapter"], vectors["merged"], atol=1e-5)
    assert not np.allclose(vectors["adapter"], vectors["base"], atol=1e-4)

    # `retriever eval --model DIR` on a small BEIR folder, for both exports.
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": "", "text": t} for i, t in
            enumerate(["shock wave boundary layer flow", "heat transfer in a cone",
                       "panel flutter at supersonic speed", "laminar jet nozzle"])]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "shock wave"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td0\t1\n")
    for model in (adapter, merged):
        assert eval_job.main(["--dataset", str(beir), "--model", str(model),
                              "--out", str(tmp_path / f"eval-{model.name}")]) == 0
        metrics = json.loads((tmp_path / f"eval-{model.name}" / "metrics.json").read_text())
        assert metrics["counts"]["queries"] == 1 and 0 <= metrics["ndcg@10"] <= 1


@pytest.fixture(scope="module")
def fault_run(assets, ray_local):
    """A 25-step ZeRO-3 run whose rank-1 worker is SIGKILLed once Ray Train has registered
    its first checkpoint."""
    from retriever.training.run import train

    out = assets["root"] / "run-fault"
    config = mechanics_config(assets, "zero3", str(out), max_steps=25, max_failures=2)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=train(config)), daemon=True)
    thread.start()
    killed = None
    deadline = time.monotonic() + 600
    snapshot = out / "checkpoints" / "checkpoint_manager_snapshot.json"
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        # Kill once Ray Train has registered a checkpoint (its snapshot names it): a checkpoint
        # whose upload finished but whose report did not reach the controller is not one.
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        except (OSError, ValueError, KeyError, TypeError):
            latest = None
        if latest:
            metrics = latest["metrics"]
            victim = next(w for w in metrics["workers"] if w["rank"] == 1)
            os.kill(victim["pid"], signal.SIGKILL)
            killed = {"pid": victim["pid"], "at_checkpoint": metrics["step"]}
        time.sleep(0.05)
    thread.join(timeout=600)
    return killed, outcome.get("result")


def test_a_killed_worker_resumes_from_the_last_checkpoint(runs, fault_run):
    """SIGKILL one training worker mid-run: the worker group restarts from the latest
    checkpoint (the step counter continues) and the run finishes with the losses an
    uninterrupted run has."""
    reference = losses(runs("zero3"))  # 10 steps, constant lr: a prefix of the longer run
    killed, result = fault_run
    assert killed is not None, "the run ended before a checkpoint could be seen"
    assert result is not None and result.error is None
    manifest = result.manifest
    assert len(manifest["resumes"]) == 1
    resumed = manifest["resumes"][0]["from_step"]
    assert resumed >= killed["at_checkpoint"] and resumed % 5 == 0 and 0 < resumed < 25
    assert killed["pid"] not in [w["pid"] for w in manifest["workers"]]  # a new worker group
    history = losses(result)
    assert len(history) == 25  # steps 1..25, each once: continued, not restarted at 0
    assert np.allclose(history[:10], reference, rtol=0, atol=LOSS_TOLERANCE)


def test_a_finished_run_is_extended_from_its_checkpoint(runs, assets, fault_run):
    """The same command with more steps resumes the finished 10-step ZeRO-2 run from its last
    checkpoint (weights and Adam state restored) and continues exactly as the uninterrupted
    25-step ZeRO-3 run did."""
    from retriever.training.run import train

    first = runs("zero2")
    before = losses(first)
    again = train(mechanics_config(assets, "zero2", first.out, max_steps=15))
    assert again.error is None
    assert [r["from_step"] for r in again.manifest["resumes"]] == [10]
    extended = losses(again)
    assert extended[:10] == before
    _, uninterrupted = fault_run
    assert np.allclose(extended[10:15], losses(uninterrupted)[10:15], rtol=0,
                       atol=LOSS_TOLERANCE)


def test_settings_change_refuses_to_resume(runs, assets):
    from retriever.errors import InputError
    from retriever.training.run import train

    first = runs("ddp")
    with pytest.raises(InputError, match="learning_rate: 0.001 -> 0.0005"):
        train(mechanics_config(assets, "ddp", first.out, learning_rate=5e-4))


# ---------------------------------------------------------------------------- GradCache


PROBED = ("ddp", "zero2", "zero3")  # zero3 last: its HfDeepSpeedConfig is released after it


def probe_strategy(payload: dict, strategy: str) -> dict:
    """The training setup for ``strategy``, then one micro-batch's LoRA gradients twice, by
    the plain graph over the same chunks and by GradCache, each from the same RNG state."""
    from retriever.training import loop
    from retriever.training.gradcache import cached_backward, chunked_backward

    worker = loop._start_worker({**payload, "config": {**payload["config"],
                                                       "strategy": strategy}})
    loop._load_texts(worker)
    loop._configure_deepspeed(worker)
    loop._build_peft_model(worker)
    torch.manual_seed(1)
    with torch.no_grad():  # lora_B starts at 0, which would leave lora_A without gradient
        for name, parameter in worker.peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    loop._build_engine(worker, None)
    worker.module.train()
    config, device = worker.config, worker.device
    batch = worker.sampler.micro_batch(0, 0, worker.rank)
    q = worker.texts.batch(batch.queries, "query", device)
    p = worker.texts.batch(batch.passages, "passage", device)
    loss_fn = loop.loss_function(worker, batch.query_ids)
    grads, found = {}, {}
    for name in ("plain", "cached"):
        torch.manual_seed(7)
        if name == "plain":
            found[name] = float(chunked_backward(worker.engine, q, p, loss_fn,
                                                 config.grad_cache_chunk, True))
        else:
            found[name] = float(cached_backward(worker.engine, q, p, loss_fn,
                                                config.grad_cache_chunk, True, device))
        grads[name] = worker.engine.full_gradients()
        worker.engine.step()  # clears the gradients; lr 1e-30 leaves the weights as they are
    worker.backbone.release()
    return {"grads": grads, "loss_plain": found["plain"], "loss_cached": found["cached"]}


def gradient_probe(payload: dict) -> None:
    """A worker loop: :func:`probe_strategy` for every strategy in one worker group (one
    start instead of three); rank 0 writes each one's largest relative difference (per
    tensor, ||cached - plain|| / ||plain||) and how far the strategies' gradients differ."""
    import ray.train

    from retriever.io import store

    results = {strategy: probe_strategy(payload, strategy) for strategy in PROBED}
    first = results[PROBED[0]]["grads"]["plain"]
    out = {}
    for strategy, found in results.items():
        plain, cached = found["grads"]["plain"], found["grads"]["cached"]
        out[strategy] = {
            "tensors": len(plain), "same_keys": sorted(plain) == sorted(cached),
            "max_relative": max(float((cached[k] - g).norm() / g.norm())
                                for k, g in plain.items()),
            "vs_first_strategy": max(float((g - first[k]).norm() / first[k].norm())
                                     for k, g in plain.items()),
            "min_norm_a": min(float(g.norm()) for k, g in plain.items() if "lora_A" in k),
            "loss_plain": found["loss_plain"], "loss_cached": found["loss_cached"]}
    if ray.train.get_context().get_world_rank() == 0:  # (Result keeps checkpoints' metrics)
        store.write_json(store.join(payload["out"], "probe.json"), out)
    ray.train.report({"step": 1})


@pytest.fixture(scope="module")
def gradient_probes(assets, ray_local):
    """One worker group probes ZeRO-3, ZeRO-2 and DDP; {strategy: figures}."""
    from retriever.training.run import build_trainer

    out = str(assets["root"] / "probe")
    config = mechanics_config(assets, "ddp", out, lora_dropout=0.1, grad_cache_chunk=3,
                              gradient_accumulation_steps=1, learning_rate=1e-30)
    result = build_trainer(config, out, assets["examples"], worker_loop=gradient_probe).fit()
    assert result.error is None, result.error
    return json.loads(Path(out, "probe.json").read_text())


@pytest.mark.parametrize("strategy", PROBED)
def test_grad_cache_gradients_equal_the_uncached_ones(gradient_probes, strategy):
    """LoRA dropout on, 2 workers with cross-worker negatives, gradient checkpointing on,
    chunks of 3 (queries 2, passages 3+3+2): GradCache's LoRA gradients are the plain
    graph's to 1e-5 (fp32), which only holds if the second pass replays the dropout masks
    (without the replay they differ by ~1x)."""
    metrics = gradient_probes[strategy]
    assert metrics["same_keys"] and metrics["tensors"] >= 8
    assert metrics["min_norm_a"] > 0  # every lora_A (and lora_B) gradient is in the check
    assert metrics["loss_cached"] == pytest.approx(metrics["loss_plain"], rel=1e-6)
    assert metrics["max_relative"] <= 1e-5, metrics
    assert metrics["vs_first_strategy"] <= 1e-4, metrics  # the strategies agree too


def test_grad_cache_run_has_the_uncached_runs_losses(runs, assets):
    """A 5-step ZeRO-3 run with GradCache (chunks of 3, 2 accumulation steps) trains as the
    plain run does: the same loss at every step (constant lr: the 10-step run's first 5)."""
    from retriever.training.run import train

    out = str(assets["root"] / "run-gradcache")
    result = train(mechanics_config(assets, "zero3", out, max_steps=5, grad_cache_chunk=3))
    assert result.error is None
    assert np.allclose(losses(result), losses(runs("zero3"))[:5], rtol=0, atol=LOSS_TOLERANCE)


# ---------------------------------------------------------------------------- Matryoshka


def held_out_mrr(model: str, examples: str, dims: int) -> float:
    """MRR of each held-out query's positive among all held-out positives, at ``dims``."""
    from retriever.io.formats import load_training_examples
    from retriever.modeling.encoder import Encoder, EncoderConfig

    rows = load_training_examples(examples)
    encoder = Encoder(EncoderConfig(model=model, dtype="float32", dims=dims))
    queries = encoder.encode([r.query for r in rows], "query")
    passages = encoder.encode([r.positives[0] for r in rows], "passage")
    scores = queries @ passages.T
    ranks = (scores > np.diag(scores)[:, None]).sum(axis=1) + 1
    return float(np.mean(1.0 / ranks))


def test_matryoshka_training_makes_a_short_prefix_retrieve(assets, ray_local, tmp_path):
    """DDP, 2 workers, loss over the first 8 of 32 dimensions and the full vector: the
    exported model's 8-dim embeddings retrieve held-out queries' positives better than the
    untrained model's first 8 dims, and the export records the dimensions."""
    from retriever.training.run import train

    out = str(assets["root"] / "run-matryoshka")
    result = train(mechanics_config(assets, "ddp", out, max_steps=24, learning_rate=1e-2,
                                    matryoshka_dims=[8], matryoshka_weights=[1.0, 0.5]))
    assert result.error is None
    settings = json.loads(Path(out, "merged", "retriever.json").read_text())
    assert settings["trained"]["matryoshka_dims"] == [8, 32]
    held_out = str(examples_file(tmp_path / "held-out.jsonl", n=48, seed=1))
    trained = held_out_mrr(str(Path(out, "merged")), held_out, dims=8)
    untrained = held_out_mrr(assets["model"], held_out, dims=8)
    assert trained > untrained + 0.05, (trained, untrained)


# ---------------------------------------------------------------------------- no Ray needed


def test_lora_targets_by_architecture(tmp_path):
    from transformers import AutoModel

    from retriever.training.lora import lora_config

    bert = AutoModel.from_pretrained(tiny_bert(tmp_path / "bert"))
    config = lora_config(bert, r=4, alpha=8, dropout=0.0)
    assert sorted(config.target_modules) == ["dense", "key", "query", "value"]
    assert list(config.exclude_modules) == ["pooler.dense"]
    llama = AutoModel.from_pretrained(tiny_llama(tmp_path / "llama"))
    config = lora_config(llama, r=4, alpha=8, dropout=0.0)
    assert sorted(config.target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with pytest.raises(ValueError, match="not found"):
        lora_config(bert, r=4, alpha=8, dropout=0.0, targets=["q_proj"])


def test_training_tokenization_is_the_encoders(tmp_path):
    from retriever.modeling.encoder import Encoder, EncoderConfig
    from retriever.training.texts import text_tokenizer

    model = str(tiny_llama(tmp_path / "llama"))
    texts = text_tokenizer(model)
    encoder = Encoder(EncoderConfig(model=model, dtype="float32"))
    for kind in ("query", "passage"):
        sample = ["what is a shock wave", "x " * 200]
        assert texts.tokenize(sample, kind) == encoder.tokenize(sample, kind)
    ids = texts.tokenize(["shock"], "query")[0]
    assert ids[-1] == texts.tokenizer.eos_token_id  # last-token pooling reads an EOS
    assert texts.defaults().query_prefix == "Query: " and texts.defaults().append_eos
    # trained from the zero-shot prompt: the Encoder's template, recorded for the export
    from retriever.training.config import TrainConfig
    from retriever.training.texts import training_texts

    trained = TrainConfig.from_dict({"train_data": "unused", "model": model,
                                     "prompt": "one-word", "passage_max_length": 40})
    prompted = training_texts(trained.encoder)  # what each training worker tokenizes with
    assert prompted.passage_max_length == 40
    one_word = Encoder(EncoderConfig(model=model, dtype="float32", prompt="one-word"))
    assert prompted.tokenize(sample, "query") == one_word.tokenize(sample, "query")
    assert prompted.defaults().prompt == "one-word"


def test_group_sampler_shards_deterministically(tmp_path):
    from retriever.io.formats import load_training_examples
    from retriever.training.batches import GroupSampler

    examples = load_training_examples(str(examples_file(tmp_path / "ex.jsonl", n=20)))
    make = lambda rank: GroupSampler(examples, group_size=4, per_device=2,  # noqa: E731
                                     world_size=2, accumulation=2, seed=3)
    a, b = make(0), make(1)
    assert a.steps_per_epoch == 20 // 8
    seen = []
    for step in range(a.steps_per_epoch):
        for micro in range(2):
            for rank, sampler in ((0, a), (1, b)):
                batch = sampler.micro_batch(step, micro, rank)
                assert len(batch.queries) == 2 and len(batch.passages) == 8
                assert batch == make(rank).micro_batch(step, micro, rank)  # pure function
                for i, qid in enumerate(batch.query_ids):
                    ex = examples[int(qid)]
                    assert batch.passages[4 * i] in ex.positives
                    assert set(batch.passages[4 * i + 1:4 * i + 4]) <= set(ex.negatives)
                seen += batch.query_ids
    assert len(seen) == len(set(seen)) == 16  # no query twice within an epoch
    assert a.micro_batch(a.steps_per_epoch, 0, 0) != a.micro_batch(0, 0, 0)  # next epoch


def test_bad_training_data_is_named(tmp_path):
    from retriever.io.formats import DataFormatError
    from retriever.training.run import resolve_train_data

    with pytest.raises(DataFormatError, match="missing.jsonl"):
        resolve_train_data(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "positives": []}\n')
    with pytest.raises(DataFormatError, match="bad.jsonl, line 1"):
        resolve_train_data(str(bad))
    with pytest.raises(DataFormatError, match="mine"):
        resolve_train_data(str(tmp_path))
    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(train_data="x", strategy="zero1")


@pytest.mark.s3
def test_run_folder_on_s3(s3_env, assets, ray_local, tmp_path):
    """Examples read from, checkpoints and exports written to an S3 store (SeaweedFS)."""
    from retriever.io import store
    from retriever.modeling.encoder import Encoder, EncoderConfig
    from retriever.modeling.registry import local_copy
    from retriever.training.run import train

    # The nodes' own credentials (never a runtime_env value): a local Ray inherits the
    # environment it starts in, and ray_local started before s3_env set the AWS_* variables.
    ray_local.shutdown()
    ray_local.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    examples = store.join(s3_env, "data", "examples.jsonl")
    store.write_bytes(examples, Path(assets["examples"]).read_bytes())
    out = store.join(s3_env, "runs", "tiny", "train")
    result = train(mechanics_config(assets, "ddp", out, train_data=examples, max_steps=2,
                                    checkpoint_every=1))
    assert result.error is None and result.manifest["steps"] == 2
    assert result.checkpoint and result.checkpoint.startswith(s3_env.removeprefix("s3://"))
    assert store.exists(store.join(out, "adapter", "adapter_model.safetensors"))
    assert store.exists(store.join(out, "merged", "retriever.json"))
    local = local_copy(store.join(out, "adapter"))
    encoder = Encoder(EncoderConfig(model=str(local), dtype="float32"))
    assert encoder.encode(["shock wave"], "query").shape == (1, 32)


def test_encoder_dims_truncate_then_renormalise(tmp_path):
    """``dims=`` gives the full vectors' first N dimensions, L2-normalised again; it is in
    the recorded settings (so an index's query encoder replays it) and the vector size."""
    from retriever.modeling.encoder import EncoderConfig, Encoder, WeightlessEncoder

    model = str(tiny_bert(tmp_path / "bert"))
    texts = ["shock wave boundary layer", "heat transfer cone nozzle", "panel flutter"]
    full = Encoder(EncoderConfig(model=model, dtype="float32")).encode(texts, "passage")
    short = Encoder(EncoderConfig(model=model, dtype="float32", dims=8))
    vectors = short.encode(texts, "passage")
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    assert vectors.shape == (3, 8) and np.allclose(vectors, expected, atol=1e-6)
    assert short.settings()["dims"] == 8 and short.settings()["dim"] == 8
    assert "dims" not in Encoder(EncoderConfig(model=model, dtype="float32")).settings()
    assert EncoderConfig.replaying(short.settings()).dims == 8
    with pytest.raises(ValueError, match="dims 64: .* embeds only 32 dimensions"):
        _ = WeightlessEncoder(EncoderConfig(model=model, dims=64)).dim
    with pytest.raises(ValueError, match="dims must be >= 1"):
        EncoderConfig(dims=0)
