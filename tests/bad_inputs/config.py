"""Bad-input rows for `tuneforge config` (format: README.md here).

Plain data; tests/test_bad_inputs.py runs and judges them.
"""

from bad_inputs import BINARY, run_config

CFG = "{tmp}/run.yaml"

ROWS = [
    {"id": "config-missing", "argv": ["config", "{tmp}/nope.yaml"], "stderr": "{tmp}/nope.yaml: config file not found"},
    {"id": "config-is-a-directory", "argv": ["config", "{tmp}"], "stderr": "{tmp}: is a directory"},
    {"id": "config-binary", "argv": ["config", CFG], "files": {"run.yaml": BINARY},
     "stderr": "{tmp}/run.yaml: not a text file (invalid UTF-8 at byte 0)"},
    {"id": "config-broken-yaml", "argv": ["config", CFG], "files": {"run.yaml": "train:\n  lr: [1\n"},
     "stderr": "{tmp}/run.yaml:3: not valid YAML"},
    {"id": "config-tabs-in-yaml", "argv": ["config", CFG], "files": {"run.yaml": "train:\n\tlr: 1\n"},
     "stderr": "{tmp}/run.yaml:2: not valid YAML"},
    {"id": "config-unknown-section", "argv": ["config", CFG], "files": {"run.yaml": "trian: {lr: 1}\n"},
     "stderr": "trian"},
    {"id": "config-bad-value", "argv": ["config", CFG], "files": {"run.yaml": "train: {scheduler: cosin}\n"},
     "stderr": "train.scheduler: 'cosin' is not one of"},
    {"id": "config-section-not-a-mapping", "argv": ["config", CFG], "files": {"run.yaml": "data: 3\n"},
     "stderr": "data: "},
    {"id": "config-several-problems", "argv": ["config", CFG],
     "files": {"run.yaml": "train: {lr: x, batch_size: -1}\n"}, "stderr": "train.lr"},
    {"id": "config-override-empty-key", "argv": ["config", CFG, "a..b=1"], "files": {"run.yaml": run_config()},
     "stderr": "a..b=1: empty key in the override"},
    {"id": "config-override-empty-value", "argv": ["config", CFG, "train.lr="], "files": {"run.yaml": run_config()},
     "stderr": "train.lr"},
    {"id": "config-override-bad-yaml", "argv": ["config", CFG, "method.target_modules=[q"],
     "files": {"run.yaml": run_config()}, "stderr": "method.target_modules: the value '[q' is not valid YAML"},
    {"id": "config-override-conflict", "argv": ["config", CFG, "train=1", "train.lr=2"],
     "files": {"run.yaml": run_config()}, "stderr": "train.lr: conflicts with another override"},
]  # fmt: skip
