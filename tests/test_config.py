"""Config contract: defaults, overrides, and errors that name the key path before anything loads."""

from pathlib import Path

import pytest

from tuneforge.config import RunConfig, build_config, describe, load_config, parse_overrides
from tuneforge.errors import ConfigError

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def test_defaults_follow_the_design_contract():
    cfg = build_config({})
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.model.dtype == "auto" and cfg.model.trust_remote_code is False
    assert cfg.method.name == "lora" and cfg.method.r == 16 and cfg.method.alpha == 32
    assert cfg.method.target_modules == "all-linear"
    assert cfg.data.truncation == "truncate" and cfg.data.on_bad_row == "fail"
    assert cfg.train.scheduler == "cosine" and cfg.train.batch_size == 8


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_shipped_example_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.yaml", "full_finetune.yaml", "lora_own_jsonl.yaml"} <= names


def test_overrides_by_dotted_path():
    cfg = build_config(
        {"method": {"name": "lora"}}, ["train.lr=1e-4", "method.r=8", "data.validation=null"]
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.method.r == 8
    assert cfg.data.validation is None


@pytest.mark.parametrize(
    "raw, overrides, expected",
    [
        (
            {"train": {"max_stepz": 3}},
            [],
            "train.max_stepz: unknown key (did you mean 'max_steps'?)",
        ),
        (
            {},
            ["train.scheduler=cosin"],
            "train.scheduler: 'cosin' is not one of constant, linear, cosine, cosine_with_min_lr, "
            "polynomial",
        ),
        ({"method": {"name": "lora", "rr": 4}}, [], "method.rr: unknown key (did you mean 'r'?)"),
        (
            {"method": {"name": "loraa"}},
            [],
            "method.name: 'loraa' is not one of adalora, freeze, full, hybrid, ia3, lora, prefix, "
            "prompt, ptuning (did you mean 'lora'?)",
        ),
        ({}, ["data.validation=1.5"], "data.validation: a ratio must be in (0, 1), got 1.5"),
        ({}, ["train.batch_size=0"], "train.batch_size: Input should be greater than 0"),
        ({}, ["model.dtype=fp16"], "model.dtype: 'fp16' is not one of auto, bf16, fp32"),
        ({"bogus": {}}, [], "bogus: unknown key"),
    ],
)
def test_bad_values_name_the_key_path(raw, overrides, expected):
    with pytest.raises(ConfigError) as err:
        build_config(raw, overrides)
    assert expected in str(err.value).splitlines()  # the whole line, not a prefix of it


def test_several_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        build_config({"train": {"lrr": 1}, "method": {"name": "lora", "r": -1}})
    msg = str(err.value)
    assert "train.lrr" in msg and "method.r" in msg


def test_early_stopping_needs_validation():
    with pytest.raises(ConfigError, match="early_stopping"):
        build_config({"data": {"validation": None}, "eval": {"early_stopping": {"patience": 2}}})


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides(["train.lr"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_key_has_a_doc_line():
    rows = describe()
    assert len(rows) > 30
    undocumented = [path for path, _, doc in rows if not doc]
    assert undocumented == []


def test_config_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, tuneforge.methods, tuneforge.config as c; c.build_config({}); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_digest_changes_with_config():
    assert build_config({}).digest() != build_config({}, ["train.lr=0.001"]).digest()
    assert build_config({}).digest() == build_config({}).digest()


def test_readme_error_example_is_what_the_cli_prints(capsys):
    """The README shows a real error message; it must stay the one the CLI prints."""
    from pathlib import Path

    from tuneforge.cli import main

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(readme) if line.startswith("$ tuneforge train "))
    shown = []
    for line in readme[start + 1 :]:
        if line.startswith("```"):
            break
        shown.append(line)
    argv = readme[start].split()[2:]
    argv[1] = str(root / argv[1])
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == shown
