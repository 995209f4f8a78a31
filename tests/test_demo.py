"""The README's main job, end to end on Cranfield (a shorter training run than the default:
0.12 of an epoch, ~4 steps: the stage, not the quality, is under test here)."""

import json
import os
import re
import subprocess
import sys

import pytest

from retriever.ops.cluster import free_port
from tests.helpers import REPO, dataset


@pytest.mark.slow
@pytest.mark.timeout(3000)  # a loaded 2-core machine runs it 2-3x slower
def test_demo_runs_every_stage_and_prints_the_table_and_a_served_answer(tmp_path):
    store_root = tmp_path / "store"
    env = dict(os.environ, RETRIEVER_STORE=str(store_root))
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    command = [sys.executable, "-m", "jobs.demo", "--dataset", dataset("cranfield"),
               "--epochs", "0.12", "--serve", "check", "--port", str(port)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=2400)
    out = proc.stdout
    (tmp_path / "demo.log").write_text(out + proc.stderr)  # kept by pytest, for a look after
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("[1/5] split", "[2/5] mine", "[3/5] fine-tune", "[4/5] evaluate",
                  "[5/5] serve"):
        assert stage in out, stage
        assert re.search(rf"^{re.escape(stage)} done in (\d+m)?\d+s", out, re.M), stage
    # not a terminal: a quiet run -- no Ray / Ray Data log blocks, progress every few seconds
    printed = out.splitlines() + proc.stderr.splitlines()
    assert len(printed) <= 80, f"{len(printed)} lines:\n" + "\n".join(printed)
    assert "{'test': 75, 'train': 150} queries" in out
    assert re.search(r"step \d+/\d+  loss \d", out), "no training progress"
    table = re.search(r"\| cranfield-heldout \|(.+)\|", out)
    assert table, out[-2000:]
    # one row in the NDCG@10 table (the intervals table below it has one per model)
    assert len(re.findall(r"^\| cranfield-heldout \| \**\d", out, re.M)) == 1, out[-3000:]
    assert f"search page: http://127.0.0.1:{port}/" in out
    assert "curl -s" in out and re.search(r"^\s+1\. +\S+ +\d\.\d{3}", out, re.M)
    # every stage left its artefacts in the store
    matrix = store_root / "evals" / "demo-cranfield-s0"
    assert (matrix / "report.html").exists() and (matrix / "ndcg.png").exists()
    metrics = {m: json.loads((matrix / m / "cranfield-heldout" / "metrics.json").read_text())
               for m in ("bm25", "minilm", "minilm-lora")}
    assert all(m["counts"]["queries"] == 75 for m in metrics.values())
    provenance = json.loads((matrix / "minilm-lora" / "cranfield-heldout" /
                             "provenance.json").read_text())
    assert "merged" in provenance["model"] and provenance["settings"]["shards"] == 2

    again = subprocess.run(command[:-4] + ["--serve", "off"], capture_output=True, text=True,
                           cwd=REPO, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("(reused)") == 3  # the three evaluations
    assert "reusing the finished run" in again.stdout  # and the training
