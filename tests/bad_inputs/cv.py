"""Bad-input rows for `tuneforge cv` (format: README.md here).

Plain data; tests/test_bad_inputs.py runs and judges them.
"""

from bad_inputs import BROKEN_MODELS, TOY_JSONL, run_config

CFG = "{tmp}/run.yaml"
VALID = {"run.yaml": run_config(), "train.jsonl": TOY_JSONL}

ROWS = [
    {"id": "cv-one-fold", "argv": ["cv", CFG, "--folds", "1"], "files": VALID,
     "stderr": "--folds: cross-validation needs at least 2 folds, got 1"},
    {"id": "cv-more-folds-than-rows", "argv": ["cv", CFG, "--folds", "50"], "files": VALID,
     "stderr": "--folds: 16 usable rows cannot make 50 non-empty folds"},
    {"id": "cv-folds-not-a-number", "argv": ["cv", CFG, "--folds", "three"], "files": VALID,
     "stderr": "argument --folds: invalid int value: 'three'"},
    {"id": "cv-config-missing", "argv": ["cv", "{tmp}/nope.yaml"],
     "stderr": "{tmp}/nope.yaml: config file not found"},
    {"id": "cv-override-bad-yaml", "argv": ["cv", CFG, "train.lr=[1"], "files": VALID,
     "stderr": "train.lr: the value '[1' is not valid YAML"},
    {"id": "cv-data-json-object", "argv": ["cv", CFG],
     "files": {"run.yaml": run_config(train="{tmp}/d.json"), "d.json": '{"a": 1}'},
     "stderr": "{tmp}/d.json: expected a JSON array"},
    {"id": "cv-output-not-empty", "argv": ["cv", CFG], "files": {**VALID, "out/x": "x"},
     "stderr": "output.dir: {tmp}/out is not empty"},
    *(
        {"id": f"cv-model-{name}", "argv": ["cv", CFG],
         "files": {**files, **VALID, "run.yaml": run_config(model=model)}, "setup": setup, "stderr": substring}
        for name, model, files, setup, substring in BROKEN_MODELS[:3]
    ),
]  # fmt: skip
