"""Model name -> builder, default weights, preprocessing and label metadata.

Everything comes from torchvision's own registry and weights enums, so mean,
std, crop size and category names are never copied by hand. A model family from
elsewhere is a branch in `get_model_spec` here, plus its weights in
`models/weights.py` (`_from_torchvision` knows torchvision's enums only).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torchvision.models as tvm
from torchvision.models import WeightsEnum
from torchvision.transforms import InterpolationMode

from models.errors import UserError


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input: shorter side to `resize_size` (with
    `interpolation`, antialiased), centre crop to `crop_size`, scale to [0, 1],
    normalise by mean/std."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: InterpolationMode = InterpolationMode.BILINEAR


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., torch.nn.Module]
    default_weights: WeightsEnum

    @property
    def categories(self) -> list[str]:
        return list(self.default_weights.meta["categories"])

    @property
    def preprocessing(self) -> Preprocessing:
        t = self.default_weights.transforms()
        return Preprocessing(
            resize_size=int(t.resize_size[0]),
            crop_size=int(t.crop_size[0]),
            mean=tuple(t.mean),
            std=tuple(t.std),
            interpolation=t.interpolation,
        )


@cache
def classification_model_names() -> tuple[str, ...]:
    return tuple(sorted(tvm.list_models(module=tvm)))


def get_model_spec(name: str) -> ModelSpec:
    """Look up a torchvision classification model by name; `ValueError` names the unknown one."""
    names = classification_model_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(
            f"unknown model {name!r}: --model takes a torchvision classification model name "
            f"such as resnet50, resnet18, resnet101, convnext_tiny, efficientnet_b0.{hint}"
        )
    return ModelSpec(
        name=name,
        builder=tvm.get_model_builder(name),
        default_weights=tvm.get_model_weights(name).DEFAULT,
    )
