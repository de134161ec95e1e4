"""Model name -> its `ModelFamily` (models/family.py).

The family shipped is torchvision's classifiers, split at their last Linear
layer: everything comes from torchvision's own registry and weights enums, so
mean, std, crop size and category names are never copied by hand. A model from
elsewhere is a `ModelFamily` subclass in a module of its own, made known by
name with `register_family` (called where that module is imported, or by a
branch in `model_family` here).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache

import torch
import torchvision.models as tvm

from models.errors import UserError, WeightsError
from models.family import ModelFamily, Preprocessing, PublishedWeights


def _last_linear_name(module: torch.nn.Module) -> str:
    names = [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    if not names:
        raise UserError(f"{type(module).__name__} has no Linear classification head to take embeddings from")
    return names[-1]


class FeaturesAndLogits(torch.nn.Module):
    """A classifier split at its last Linear layer: returns (the head's input, logits).

    The head's input is the globally pooled penultimate feature vector for every
    torchvision classifier (ResNet `fc`, ConvNeXt/EfficientNet `classifier[-1]`,
    ViT `heads.head`). An explicit module, not a forward hook, so it traces and
    compiles like any other.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        name = _last_linear_name(model)
        self.head = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, torch.nn.Identity())
        self.body = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.flatten(self.body(x), 1)
        return features, self.head(features)


@dataclass(frozen=True)
class TorchvisionClassifier(ModelFamily):
    """A torchvision classification model (resnet50, convnext_tiny, ...): the
    embedding is the input of its last Linear layer, the labels its ImageNet classes."""

    name: str
    preprocessing: Preprocessing

    @property
    def labels(self) -> tuple[str, ...]:
        return _categories(self.name)

    def module(self) -> torch.nn.Module:
        return tvm.get_model_builder(self.name)(weights=None)

    def network(self, module: torch.nn.Module) -> torch.nn.Module:
        return FeaturesAndLogits(module)

    def published_weights(self, name: str) -> PublishedWeights:
        enum = tvm.get_model_weights(self.name)
        name = name.split(".", 1)[1] if name.startswith(enum.__name__ + ".") else name
        try:
            weights = enum[name] if name != "DEFAULT" else enum.DEFAULT
        except KeyError:
            options = ", ".join(w.name for w in enum)
            raise WeightsError(f"unknown weights {name!r} for {self.name}: pass one of {options}, DEFAULT, "
                               "a file path, an s3:// key, or random:SEED") from None
        return PublishedWeights(f"{enum.__name__}.{weights.name}", weights.url)


@cache
def _categories(name: str) -> tuple[str, ...]:
    return tuple(tvm.get_model_weights(name).DEFAULT.meta["categories"])


@cache
def classification_model_names() -> tuple[str, ...]:
    return tuple(sorted(tvm.list_models(module=tvm)))


_registered: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> None:
    """Make a family from outside torchvision known by its `name` (in this process:
    a Dask worker imports the module that registers it, like any other code)."""
    _registered[family.name] = family


def model_family(name: str) -> ModelFamily:
    """The family of the model called `name`; a `UserError` names the unknown one and the nearest names."""
    if name in _registered:
        return _registered[name]
    return _torchvision_family(name)


@cache
def _torchvision_family(name: str) -> ModelFamily:
    names = classification_model_names() + tuple(_registered)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(
            f"unknown model {name!r}: --model takes a torchvision classification model name "
            f"such as resnet50, resnet18, resnet101, convnext_tiny, efficientnet_b0.{hint}"
        )
    t = tvm.get_model_weights(name).DEFAULT.transforms()
    return TorchvisionClassifier(name, Preprocessing(resize_size=int(t.resize_size[0]), crop_size=int(t.crop_size[0]),
                                                     mean=tuple(t.mean), std=tuple(t.std),
                                                     interpolation=t.interpolation))
