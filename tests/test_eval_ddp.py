"""Generation eval under 2-process DDP: each rank answers its share, rank 0 scores them all in order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tuneforge.cli import main

from helpers import write_run_config, write_toy_messages

pytestmark = pytest.mark.dist


def test_ddp_generation_eval_gathers_every_row_in_order(tmp_path, tiny_model_dir):
    data = write_toy_messages(tmp_path / "train.jsonl", n=24)
    val = write_toy_messages(tmp_path / "val.jsonl", n=7, seed=9)  # odd: ranks get 4 and 3
    runs = {}
    for name, batch in (("one", 4), ("two", 2)):
        runs[name] = write_run_config(
            tmp_path / f"{name}.yaml",
            tiny_model_dir,
            data,
            tmp_path / name,
            data={"validation": str(val)},
            train={"max_steps": 1, "batch_size": batch, "lr": 1e-6},
            eval={
                "every_steps": None,
                "generate": True,
                "max_new_tokens": 4,
                "num_samples": 10,
                "metrics": ["loss", "exact_match", "accuracy"],
            },  # fmt: skip
            log={"report": False},
        )
    assert main(["train", str(runs["one"]), "--quiet"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "tuneforge.cli", "train", str(runs["two"]), "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]

    def samples(name):
        lines = (tmp_path / name / "samples.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines]

    one, two = samples("one"), samples("two")
    assert len(two) == 7  # every validation row, not only rank 0's share
    assert [s["source"] for s in two] == [s["source"] for s in one]  # file order kept
    assert [s["reference"] for s in two] == [s["reference"] for s in one]
    assert [s["prediction"] for s in two] == [s["prediction"] for s in one]
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())["eval"]
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())["eval"]
    assert s2["eval_exact_match"] == s1["eval_exact_match"]
    assert s2["eval_accuracy"] == s1["eval_accuracy"]
