"""retriever.config: flags and YAML/JSON files into typed job configs (jsonargparse)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import yaml

from retriever import config as cfg
from retriever.evaluation.single import EvalConfig
from retriever.modeling.encoder import EncoderConfig
from retriever.training.config import TrainConfig


def _parse_error(capsys, cls, argv) -> str:
    with pytest.raises(SystemExit) as info:
        cfg.parse(cls, argv, prog="t")
    assert info.value.code == 2  # a usage error, as argparse exits
    return capsys.readouterr().err


def _write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if name.endswith(".yaml") else json.dumps(data))
    return str(path)


def test_a_wrongly_typed_file_value_is_an_error_naming_the_key(tmp_path, capsys):
    path = _write(tmp_path, {"train_data": "x", "epochs": "abc"})
    assert "epochs" in _parse_error(capsys, TrainConfig, ["--config", path])
    path = _write(tmp_path, {"dataset": "d", "query_max_length": "long"})
    assert "query_max_length" in _parse_error(capsys, EvalConfig, ["--config", path])


def test_unknown_keys_in_the_file_are_named(tmp_path, capsys):
    path = _write(tmp_path, {"dataset": "d", "no_such_option": 1}, "c.json")
    assert "no_such_option" in _parse_error(capsys, EvalConfig, ["--config", path])


def test_flags_override_the_file_wherever_they_stand(tmp_path):
    path = _write(tmp_path, {"dataset": "d", "top_k": 10, "pooling": "cls"})
    for argv in (["--config", path, "--top-k", "5"], ["--top-k", "5", "--config", path],
                 ["--top-k=5", f"--config={path}"]):
        config = cfg.parse(EvalConfig, argv, prog="t")
        assert (config.dataset, config.top_k, config.encoder.pooling) == ("d", 5, "cls")


def test_nested_encoder_options_are_flat_flags_and_keys(tmp_path):
    path = _write(tmp_path, {"dataset": "d", "query_prefix": "Q: ", "prompt": "one-word"})
    config = cfg.parse(EvalConfig, ["--config", path, "--model", "smollm2-135m",
                                    "--pooling", "last", "--normalize", "false"], prog="t")
    assert config.encoder == EncoderConfig(model="smollm2-135m", pooling="last",
                                           query_prefix="Q: ", prompt="one-word",
                                           normalize=False)
    flat = cfg.to_dict(config)
    assert flat["model"] == "smollm2-135m" and "encoder" not in flat
    assert cfg.build(EvalConfig, flat) == config


def test_the_train_recipes_load_unchanged():
    config = cfg.parse(TrainConfig, ["--config", "configs/train/smollm2-cranfield.yaml"], "t")
    assert config.encoder.model == config.model == "smollm2-135m"
    assert (config.encoder.query_max_length, config.encoder.passage_max_length) == (32, 64)
    assert config.dtype == "bfloat16"  # the trainer's precision, not an Encoder option
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_a_job_may_take_some_encoder_options_only(capsys):
    assert "batch_size" not in cfg.to_dict(TrainConfig(train_data="x"))
    assert "unrecognized" in _parse_error(capsys, TrainConfig,
                                         ["--train-data", "x", "--instruction", "find code"])


def test_required_options_choices_and_bools(capsys):
    assert "dataset" in _parse_error(capsys, EvalConfig, [])
    assert "prompt" in _parse_error(capsys, EvalConfig, ["--dataset", "d", "--prompt", "two"])
    assert cfg.parse(EvalConfig, ["--dataset", "d", "--ignore-identical-ids"],
                     "t").ignore_identical_ids is True
    assert cfg.parse(EvalConfig, ["--dataset", "d", "--ignore-identical-ids", "false"],
                     "t").ignore_identical_ids is False


def test_config_checks_become_usage_errors(capsys):
    assert "pooling" in _parse_error(capsys, EvalConfig, ["--dataset", "d", "--pooling", "max"])


def test_a_config_file_at_a_url_is_read_through_the_store(capsys):
    import fsspec

    with fsspec.open("memory://configs/eval.yaml", "w") as handle:
        handle.write("dataset: d\ntop_k: 7\n")
    assert cfg.parse(EvalConfig, ["--config", "memory://configs/eval.yaml"], "t").top_k == 7


def test_help_comes_from_field_metadata(capsys):
    with pytest.raises(SystemExit):
        cfg.parse(EvalConfig, ["--help"], prog="retriever eval")
    out = capsys.readouterr().out
    assert "--query-prefix" in out and "text put before each query" in out


def test_an_option_declared_twice_is_refused():
    @dataclass
    class Clashing:
        model: str = field(default="x")
        encoder: EncoderConfig = cfg.flat(EncoderConfig)

    with pytest.raises(TypeError, match="model"):
        cfg.options(Clashing)


def test_per_job_defaults_and_prefixes():
    @dataclass
    class Job:
        dense: EncoderConfig = cfg.flat(EncoderConfig, prefix="dense_", only=("model",
                                                                             "batch_size"),
                                        batch_size=8)

    assert [(o.name, o.default) for o in cfg.options(Job)] == [("dense_model", "minilm"),
                                                                ("dense_batch_size", 8)]
    assert cfg.build(Job, {"dense_model": "m"}).dense == EncoderConfig(model="m", batch_size=8)
    with pytest.raises(TypeError, match="batch_size"):
        cfg.build(Job, {"batch_size": 3})
