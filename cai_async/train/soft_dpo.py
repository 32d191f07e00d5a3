"""Soft-label DPO: each pair's AI-feedback ``confidence`` becomes its own target. The loss is conservative DPO
with a per-example smoothing ε_i = 1 − confidence_i:

    loss_i = −(1 − ε_i) · log σ(β Δ_i) − ε_i · log σ(−β Δ_i)

where Δ_i is the policy-vs-reference log-ratio margin of chosen over rejected — what the paper's soft labels
call for and what TRL's single global ``label_smoothing`` cannot express. torch and TRL are imported lazily."""

from __future__ import annotations

import functools
import sys
from typing import Any

__all__ = ["soft_dpo_loss", "soft_dpo_trainer_class"]


def soft_dpo_loss(logits: Any, confidence: Any) -> Any:
    """Per-example loss from ``logits`` = β·Δ and the probability that chosen is better."""
    import torch.nn.functional as F

    epsilon = (1.0 - confidence).clamp(0.0, 1.0).to(logits.dtype)
    return -(1.0 - epsilon) * F.logsigmoid(logits) - epsilon * F.logsigmoid(-logits)


@functools.cache
def soft_dpo_trainer_class() -> Any:
    """``SoftDPOTrainer``: TRL's ``DPOTrainer`` with per-example soft labels (built on first use, so importing
    this module does not import TRL)."""
    import importlib

    import torch

    DPOTrainer: Any = importlib.import_module("trl").DPOTrainer

    class SoftDPOTrainer(DPOTrainer):  # type: ignore[misc]
        """TRL's ``DPOTrainer`` (sigmoid loss, reverse KL) with a per-example ``confidence`` column as the soft
        target. The column rides along through the collator and replaces the hard label in the loss."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if list(self.loss_types) != ["sigmoid"] or self.f_divergence_type != "reverse_kl":
                raise ValueError("soft-label DPO needs loss_type ['sigmoid'] and f_divergence_type 'reverse_kl'")
            base: Any = getattr(self, "data_collator")  # noqa: B009 - set by the base class at run time

            def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
                confidence = torch.tensor([float(e["confidence"]) for e in examples], dtype=torch.float32)
                batch: dict[str, Any] = base([{k: v for k, v in e.items() if k != "confidence"} for e in examples])
                batch["confidence"] = confidence
                return batch

            setattr(self, "data_collator", collate)  # noqa: B010

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            columns: list[str] = list(getattr(self, "_signature_columns", None) or [])
            if "confidence" not in columns:
                setattr(self, "_signature_columns", [*columns, "confidence"])  # noqa: B010

        def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
            confidence = inputs.pop("confidence").to(self.accelerator.device)
            module: Any = sys.modules[DPOTrainer.__module__]
            functional = module.F
            calls: list[int] = []

            class _SoftF:
                """``torch.nn.functional`` whose ``logsigmoid`` (the sigmoid DPO loss's only call) is the soft one."""

                def __getattr__(self, name: str) -> Any:
                    return getattr(functional, name)

                @staticmethod
                def logsigmoid(x: Any) -> Any:
                    calls.append(1)
                    return -soft_dpo_loss(x, confidence)

            module.F = _SoftF()
            try:
                result = super()._compute_loss(model, inputs, return_outputs)
            finally:
                module.F = functional
            if len(calls) != 1:
                raise RuntimeError(f"soft-label DPO expected TRL's sigmoid loss to call logsigmoid once, saw "
                                   f"{len(calls)}: this TRL version is not supported (tested with trl 1.16)")
            return result

    return SoftDPOTrainer

