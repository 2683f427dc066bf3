"""Config sections for scarce data: augmentation (data.augment) and meta-learning (meta).

Typed like every section; the transforms are augment/'s and the meta-training recipe's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tuneforge.config.base import Section
from tuneforge.config.messages import not_one_of
from tuneforge.constants import AUGMENT_OPS


class AugmentSection(Section):
    ops: list[str] = Field(
        default_factory=lambda: list(AUGMENT_OPS),
        description="EDA transforms: synonym, insert, swap, delete; copy c of a row applies "
        "ops[c mod len(ops)].",
    )
    n: int = Field(4, ge=1, description="Augmented copies made of each training row.")
    alpha: float = Field(
        0.1, gt=0.0, le=1.0, description="Strength: the share of a text's words a copy changes."
    )
    seed: int | None = Field(None, description="Seed of the copies; null: train.seed.")
    lang: Literal["auto", "zh", "en"] = Field(
        "auto",
        description="Language whose words change (zh: Tongyici Cilin, en: WordNet); auto: "
        "per text, by script. Set it for prompts that mix an English template with Chinese text.",
    )
    targets: bool = Field(
        False,
        description="Also change the answers (assistant turns, plain text); labels never change.",
    )

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"give at least one of {', '.join(AUGMENT_OPS)}")
        for name in v:
            if name not in AUGMENT_OPS:
                raise ValueError(not_one_of(name, AUGMENT_OPS))
        return v


class MetaSection(Section):
    algorithm: Literal["reptile", "fomaml"] = Field(
        "reptile",
        description="reptile: move the meta-adapter toward each task's adapted weights; fomaml: "
        "first-order MAML, step along the query-set gradient at the adapted weights.",
    )
    tasks: str | list[str] = Field(
        "task",
        description="A field of data.train naming each row's task, or a list of files (one "
        "task each, named by the file's stem).",
    )
    held_out: list[str] = Field(
        default_factory=list,
        description="Tasks kept out of meta-training; at the end each is adapted from the "
        "meta-adapter and from a fresh adapter, and both query losses are reported.",
    )
    shots: int = Field(4, ge=1, description="Support rows per task per episode (k).")
    query_shots: int = Field(4, ge=1, description="Query rows per task per episode.")
    inner_steps: int = Field(5, ge=1, description="Optimizer steps on the support rows per task.")
    inner_lr: float = Field(1e-3, gt=0, description="Learning rate of the inner steps.")
    inner_optimizer: Literal["adam", "sgd"] = Field(
        "adam",
        description="adam: a fresh Adam per task with beta1 = 0 (as in the Reptile paper); sgd.",
    )
    meta_lr: float = Field(
        1.0,
        gt=0,
        description="Outer rate: Reptile's step size epsilon toward the adapted weights (with "
        "sgd), or the rate of the outer optimizer on the FOMAML gradient.",
    )
    meta_optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="Optimizer of the meta-update (its state is checkpointed)."
    )
    meta_steps: int = Field(100, ge=1, description="Meta-updates (episodes).")
    tasks_per_step: int = Field(
        4, ge=1, description="Tasks sampled per meta-update (their updates are averaged)."
    )
    eval_episodes: int = Field(
        4, ge=1, description="Adaptation episodes per held-out task in the final measurement."
    )
