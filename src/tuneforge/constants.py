"""Names shared across packages, defined once: label masking, schedules, formats, metric names.

Plain tuples and ints only (no torch); the config's `Literal` types are built from these, so the
accepted values and the code that branches on them cannot drift apart.
"""

from __future__ import annotations

#: Label value for a position that carries no loss (the convention of torch's cross-entropy).
IGNORE_INDEX = -100

#: train.scheduler: learning-rate schedules (train/optim.py implements each).
SCHEDULES = ("constant", "linear", "cosine", "cosine_with_min_lr", "polynomial")
#: train.layer_lr_direction: which end of the network gets the smaller layer-wise rate.
LR_DIRECTIONS = ("shallow_smaller", "deep_smaller")
#: data.format: row formats data/formats.py reads ("auto" detects one of these).
DATA_FORMATS = ("alpaca", "messages", "sharegpt", "text", "classification")
#: data.augment.ops: the EDA transforms tuneforge.augment registers (a test keeps them in step).
AUGMENT_OPS = ("synonym", "insert", "swap", "delete")

#: eval.metrics names: loss-based, label log-likelihood, and scores of generated text.
LOSS_METRICS = ("loss", "perplexity")
LABEL_METRICS = ("accuracy", "macro_f1")
GENERATION_METRICS = ("bleu", "chrf", "rouge", "exact_match")
EVAL_METRICS = LOSS_METRICS + LABEL_METRICS + GENERATION_METRICS

#: The feedback store's SQLite file, in RUN_DIR/serve/: `serve` writes it, `retrain` and the UI read it.
FEEDBACK_STORE_FILE = "feedback.sqlite"
