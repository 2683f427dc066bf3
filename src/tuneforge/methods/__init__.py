"""The method registry: every fine-tuning method registers its options model and class by name.

Adding a method means adding a module here that calls `register`; neither the config nor the
training loop names methods. Method modules import torch and peft lazily, inside their hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from tuneforge.config import MethodSection, register_method_options

if TYPE_CHECKING:
    import torch

_REGISTRY: dict[str, type[Method]] = {}


class Method:
    """A fine-tuning method: wraps a base model and says how its result is saved.

    Subclasses set `name` and `Options`, and override the hooks they need. The recipe calls
    `plan` (the run length) and `apply` once, `param_groups` once, and the loop calls `on_step`
    after each optimizer step (before `zero_grad`).
    """

    name: ClassVar[str]
    Options: ClassVar[type[MethodSection]]
    #: "adapter" saves PEFT files under run/adapter/; "model" saves a full HF model under run/model/.
    artifact: ClassVar[str] = "adapter"
    #: True where the saved adapter folds into the base weights (peft `merge_and_unload`).
    mergeable: ClassVar[bool] = False
    #: True where the method prepends virtual tokens or cache entries (prefix, prompt, P-tuning):
    #: outputs then do not line up with input positions (no packing, no position-aligned loss).
    adds_virtual_tokens: ClassVar[bool] = False
    #: `tuneforge compare`'s default line-up: `key=value[:key=value...]` specs for this method
    #: (method keys, and `train.KEY` for train keys), each at a rate suited to it.
    compare_specs: ClassVar[tuple[str, ...]] = ()
    #: False where the method needs whole weight matrices or state outside the decoder blocks
    #: at every step, so that it cannot run with sharded weights (FSDP2, DeepSpeed ZeRO).
    shardable: ClassVar[bool] = True

    def __init__(self, options: MethodSection) -> None:
        self.options = options
        self.total_steps: int | None = None

    def plan(self, total_steps: int) -> None:
        """Called once before `apply` with the run's optimizer-step count (AdaLoRA's schedule)."""
        self.total_steps = total_steps

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def lr_scale(self, param_name: str) -> float:
        """Multiplier on a trainable parameter's layer-wise rate (LoRA+ raises the B matrices)."""
        return 1.0

    def param_groups(
        self, model: torch.nn.Module, lr: float, weight_decay: float, rules: Any = None
    ) -> list[dict[str, Any]]:
        """Optimizer groups: `rules` (methods.param_groups.LrRules) set layer-wise and per-pattern rates."""
        from tuneforge.methods.param_groups import build_param_groups

        return build_param_groups(model, lr, weight_decay, rules, scale=self.lr_scale)

    def on_step(self, model: torch.nn.Module, step: int) -> None:
        """Per-step work after `optimizer.step()` and before `zero_grad()` (e.g. AdaLoRA ranks)."""

    def for_inference(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as evaluation and generation should call it (default: itself)."""
        return model

    def save(
        self, model: torch.nn.Module, path: str, state_dict: dict[str, Any] | None = None
    ) -> None:
        """Save the result; `state_dict` (gathered from sharded weights) replaces the model's own."""
        extra = {} if state_dict is None else {"state_dict": state_dict}
        model.save_pretrained(path, safe_serialization=True, **extra)

    def fold_saved(self, base: torch.nn.Module, adapter_dir: str) -> bool:
        """Merge the adapter saved in `adapter_dir` into `base`'s weights in place, for a model
        loaded only to be evaluated; False (base untouched) where `load` must be used instead."""
        return False

    def load(
        self,
        base: torch.nn.Module,
        adapter_dir: str,
        *,
        name: str = "default",
        trainable: bool = False,
    ) -> torch.nn.Module:
        """The saved adapter on `base`, frozen, as evaluation and generation call it.

        Only for `artifact == "adapter"`; a full model is loaded as a plain HF model.
        `trainable=True` returns peft's training view (no inference wrapper). When `base` is
        already a peft model, the adapter is added to it as adapter `name` (its base weights
        shared, the active adapter unchanged) and that model is returned: how DPO / KTO hold
        their frozen reference policy without a second copy of the base.
        """
        from peft import PeftModel

        if isinstance(base, PeftModel):
            base.load_adapter(adapter_dir, adapter_name=name, is_trainable=trainable)
            return base
        model = PeftModel.from_pretrained(
            base, adapter_dir, adapter_name=name, is_trainable=trainable
        )
        return model if trainable else self.for_inference(model)

    def summary(self, model: torch.nn.Module) -> dict[str, Any]:
        """Method-specific numbers for summary.json."""
        return {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available as `method.name: <cls.name>`."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    register_method_options(cls.name, cls.Options)  # the config validates method.* with it
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    return _REGISTRY[name]


def build_method(options: MethodSection) -> Method:
    return _REGISTRY[options.name](options)


def _discover() -> None:
    """Import every module of this package so that each registers itself."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_discover()
