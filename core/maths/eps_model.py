"""The eps-model protocol the paper's maths runs on (issue 26: ``maths/`` imports nothing above it).

A model is any callable ``model(x_t, t, class_labels) -> eps`` with ``model.schedule``; one with a learned
variance also has ``predict(...) -> ModelOutput`` and ``variance_type``. ``predict_eps`` is the one dispatch the
samplers and the score use; ``autocast_for`` / ``effective_precision`` say in which precision a backbone
computes. ``core.nets.models`` (the networks) re-exports these names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ModelOutput:
    """What the backbone predicts: eps (N, C, H, W) and, for a learned variance, its raw variance output
    (N, C, H, W): v in [-1, 1] for learned_range, log sigma^2 for learned; None for the fixed types."""

    eps: torch.Tensor
    variance_values: Optional[torch.Tensor] = None


def predict_eps(model, x_t: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                precision: Optional[str] = None) -> ModelOutput:
    """Any eps-model of the protocol as a ModelOutput: models with ``predict`` (DiffusionModel) give their
    variance output and honour ``precision``; a plain callable ``model(x_t, t, class_labels)`` gives eps alone."""
    if hasattr(model, "predict"):
        return model.predict(x_t, t, class_labels, precision=precision)
    return ModelOutput(model(x_t, t, class_labels))


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def effective_precision(precision: str, device: torch.device | str) -> str:
    """What ``precision`` computes in on ``device``: "auto" is bf16 on CUDA (fp16 where bf16 is missing) and
    fp32 elsewhere; the others are themselves. ValueError naming the allowed values otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_for(x: torch.Tensor, precision: str = "auto"):
    """The backbone's compute precision for inputs like ``x``: "auto" = bf16 autocast on CUDA (fp16 where bf16
    is missing) and fp32 elsewhere; "fp32" = no autocast; "bf16" / "fp16" = that autocast on any device (bf16
    on a CPU is how the CUDA numerics are measured, docs/RESULTS.md; CPU autocast runs fp16 too)."""
    kind = x.device.type if x.device.type in ("cpu", "cuda") else "cpu"
    used = effective_precision(precision, x.device)
    if used == "fp32":
        return torch.autocast(kind, enabled=False)
    return torch.autocast(x.device.type, dtype=_DTYPES[used])


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) in [0, 255] -> float32 in [-1, 1], the range the models take."""
    return images_u8.float() / 127.5 - 1.0
