"""train.strategy, model.quantize and the launcher's checks, without starting any process group:
what each strategy refuses (one line naming the key), and how a failed rank is reported."""

import signal
import socket

import pytest

from tuneforge.config import build_config, load_config
from tuneforge.errors import ConfigError, UsageError
from tuneforge.recipes.distributed import run_strategy
from tuneforge.train import strategy as strategy_mod
from tuneforge.train.launch import check_port_free, describe_failure, exit_code_of
from tuneforge.train.strategy import resolve_strategy

from helpers import write_run_config, write_toy_messages


def test_auto_is_ddp_under_a_launcher_and_single_alone():
    assert resolve_strategy("auto", 1, cuda=False) == "single"
    assert resolve_strategy("auto", 4, cuda=False) == "ddp"
    assert resolve_strategy("fsdp2", 1, cuda=False) == "fsdp2"  # one shard: allowed (2 -> 1)


def test_single_with_several_processes_is_refused():
    with pytest.raises(ConfigError, match=r"^train.strategy: single runs one process, but this"):
        resolve_strategy("single", 2, cuda=False)


def test_deepspeed_needs_its_package_and_a_gpu(monkeypatch):
    monkeypatch.setattr(strategy_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'tuneforge\[deepspeed\]'"):
        resolve_strategy("deepspeed", 2, cuda=True)
    monkeypatch.setattr(strategy_mod.importlib.util, "find_spec", lambda name: object())
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        resolve_strategy("deepspeed", 2, cuda=False)


def _cfg(**sections):
    raw = {"model": {"name": "x"}, "data": {"train": "t.jsonl"}, **sections}
    return build_config(raw, [])


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"eval": {"early_stopping": {"patience": 2}}}, "eval.early_stopping"),
        ({"eval": {"metrics": ["loss", "accuracy"]}}, "eval.metrics: accuracy"),
        ({"train": {"l1": 1e-4}}, "train.l1"),
    ],
)
def test_fsdp2_refuses_what_needs_whole_weights(sections, key):
    train = {**sections.get("train", {}), "strategy": "fsdp2"}
    cfg = _cfg(**{**sections, "train": train})
    with pytest.raises(ConfigError, match=rf"^{key}.*\(train.strategy: fsdp2\)$"):
        run_strategy(cfg)


def test_deepspeed_refuses_pickled_checkpoints(monkeypatch):
    import tuneforge.recipes.distributed as dist

    # as on a GPU machine with deepspeed installed
    monkeypatch.setattr(dist, "resolve_strategy", lambda name, world, cuda: name)
    with pytest.raises(ConfigError, match=r"^checkpoint.every_steps / checkpoint.at_epoch_end"):
        run_strategy(_cfg(train={"strategy": "deepspeed"}))
    cfg = _cfg(
        train={"strategy": "deepspeed"}, checkpoint={"every_steps": None, "at_epoch_end": False}
    )
    assert run_strategy(cfg) == "deepspeed"


def test_nf4_with_a_sharding_strategy_fails_at_config_time(tmp_path, tiny_model_dir):
    data = write_toy_messages(tmp_path / "t.jsonl", n=4)
    path = write_run_config(tmp_path / "c.yaml", tiny_model_dir, data, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"model.quantize: nf4 runs with train.strategy single"):
        load_config(path, ["model.quantize=nf4", "train.strategy=fsdp2"])
    with pytest.raises(ConfigError, match=r"model.quantize"):
        load_config(path, ["model.quantize=nf8"])


def test_failed_rank_is_named_with_its_exit_code():
    assert describe_failure(1, -int(signal.SIGKILL), 42) == "rank 1 (pid 42) was killed by SIGKILL"
    assert describe_failure(0, 2, None) == "rank 0 exited with code 2"
    assert exit_code_of(-int(signal.SIGKILL)) == 137
    assert exit_code_of(3) == 3


def test_a_busy_port_is_named():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UsageError, match=rf"^--port {port}: the port is in use on 127.0.0.1"):
            check_port_free(port)
    check_port_free(port)  # free again
