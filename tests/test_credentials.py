"""No credential goes into a Ray runtime_env the project builds (the dashboard shows them).

Builds the runtime envs the code hands to Ray -- Ray Train workers' (``worker_env``), a
submitted job's (``submit.build_runtime_env``) and Train's pickled store filesystem -- with
``AWS_*`` keys in this process's environment, and checks that no key value appears in them
and that asking for one explicitly is refused with an error naming the variable.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from retriever.errors import InputError
from retriever.ops import submit
from retriever.ops.credentials import is_credential
from retriever.training.config import TrainConfig
from retriever.training.run import ray_storage, worker_env

SECRETS = {"AWS_ACCESS_KEY_ID": "AKIA-test-key-id-4711",
           "AWS_SECRET_ACCESS_KEY": "test-secret-access-key-0815",
           "AWS_SESSION_TOKEN": "test-session-token-1234"}
WHERE = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_REGION": "eu-west-1",
         "RETRIEVER_STORE": "s3://bucket/prefix"}


@pytest.fixture
def aws_env(monkeypatch):
    for name, value in {**SECRETS, **WHERE}.items():
        monkeypatch.setenv(name, value)


def _assert_no_secret(obj) -> None:
    text = json.dumps(obj, default=str)
    leaked = [name for name, value in SECRETS.items() if value in text or f'"{name}"' in text]
    assert not leaked, leaked


def test_training_worker_env_has_no_credentials(aws_env):
    env = worker_env(TrainConfig.from_dict({"train_data": "s3://bucket/x"}), use_gpu=False)
    _assert_no_secret(env)
    assert env["RETRIEVER_STORE"] == WHERE["RETRIEVER_STORE"]  # where the store is: yes
    assert env["AWS_ENDPOINT_URL_S3"] == WHERE["AWS_ENDPOINT_URL_S3"]


def test_training_worker_env_refuses_a_credential_by_name(aws_env):
    config = TrainConfig.from_dict({"train_data": "s3://bucket/x",
                                    "worker_env": {"AWS_SECRET_ACCESS_KEY": "x"}})
    with pytest.raises(InputError, match="AWS_SECRET_ACCESS_KEY"):
        worker_env(config, use_gpu=False)


def test_train_storage_filesystem_carries_no_keys(aws_env):
    """Ray Train pickles the storage filesystem to its controller and workers."""
    _, fs = ray_storage("s3://bucket/runs/x")
    blob = pickle.dumps(fs)
    assert not [n for n, v in SECRETS.items() if v.encode() in blob]


@pytest.mark.parametrize("local", [True, False])
def test_submitted_job_runtime_env_has_no_credentials(aws_env, tmp_path, local):
    env = submit.build_runtime_env(working_dir=tmp_path, local=local, pip=None,
                                   runtime_env_file=None, env={}, extra_excludes=[],
                                   max_file_mb=20, python=None)
    _assert_no_secret(env)


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "RETRIEVER_API_TOKEN", "HF_TOKEN"])
def test_submit_refuses_a_credential_in_env(tmp_path, name):
    with pytest.raises(InputError, match=name):
        submit.build_runtime_env(working_dir=tmp_path, local=False, pip=False,
                                 runtime_env_file=None, env={name: "x"}, extra_excludes=[],
                                 max_file_mb=20, python=None)


def test_submit_refuses_a_credential_in_the_runtime_env_file(tmp_path):
    path = Path(tmp_path) / "env.yaml"
    path.write_text("env_vars:\n  AWS_ACCESS_KEY_ID: x\n")
    with pytest.raises(InputError, match="AWS_ACCESS_KEY_ID"):
        submit.build_runtime_env(working_dir=tmp_path, local=False, pip=True,
                                 runtime_env_file=path, env={}, extra_excludes=[],
                                 max_file_mb=20, python=None)


def test_credential_names():
    assert all(is_credential(n) for n in [*SECRETS, "RAY_AUTH_TOKEN", "DB_PASSWORD"])
    assert not any(is_credential(n) for n in [*WHERE, "TOKENIZERS_PARALLELISM",
                                              "HF_HUB_DISABLE_TELEMETRY"])
