"""The model interface: what the embedding path (runs, search queries, labelled
examples) needs of a kind of model, apart from where and how it runs.

A `ModelFamily` says how an image becomes the model's input (`preprocess`, plain
Pillow and numpy, so decode worker processes run it without torch; and the same
resize and crop for a batch already on a GPU), what the network is (`module`, as
its weight files hold it, and `network`, that module returning its embedding and
class logits), what the vectors are (`dim`, `labels`, `fingerprint`), and where
its published weights live. `models/engine.py` runs any family's network: the
device, precision, model streams, compilation and batch size are its business,
never a family's.

torchvision's classifiers are the family shipped (`models/registry.py`). Another
(a CLIP image tower, a self-supervised backbone) subclasses `ModelFamily` in a
module of its own and is named in `registry.model_family`: two files, and the
runs, search, categorisers and the catalogue's fingerprint check take it as is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode


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
class PublishedWeights:
    """A family's named weights: what a run records as `--weights`, and where they download from."""

    spec: str
    url: str


class ModelFamily(ABC):
    """A kind of image model. Subclasses are frozen dataclasses of plain data (a
    family travels to decode processes and Dask workers); `name` names one model."""

    name: str
    preprocessing: Preprocessing

    @property
    @abstractmethod
    def labels(self) -> tuple[str, ...]:
        """The class names the network's logits are over."""

    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The model, freshly initialised, as its weight files hold it (their state dict's keys and shapes)."""

    @abstractmethod
    def network(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module`, its weights loaded, as a network taking normalised NCHW float
        input and returning (embeddings [N, dim] before normalising, logits [N, labels])."""

    @abstractmethod
    def published_weights(self, name: str) -> PublishedWeights:
        """The family's published weights called `name` ('DEFAULT': the best);
        `models.weights.WeightsError` naming the choices where there are none of that name."""

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """An RGB image as the network's input pixels: uint8 HWC, `crop_size` square."""
        return preprocess_pixels(image, self.preprocessing)

    def preprocess_on_device(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """The same for uint8 CHW tensors already on a device (JPEGs decoded there)."""
        return preprocess_on_device(images, self.preprocessing)

    @property
    def dim(self) -> int:
        return _embedding_dim(self)

    def fingerprint(self, weights_sha256: str) -> str:
        """Model plus weights: vectors with different fingerprints never share an index."""
        return f"{self.name}@{weights_sha256}"


@cache
def _embedding_dim(family: ModelFamily) -> int:
    """The embedding size, from one forward pass on the meta device (no memory, no weights)."""
    side = family.preprocessing.crop_size
    with torch.device("meta"):
        features, _ = family.network(family.module())(torch.empty(1, 3, side, side))
    return int(features.shape[1])


_PIL_RESAMPLING = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
}


def center_crop_box(width: int, height: int, prep: Preprocessing) -> tuple[float, float, float, float]:
    """The region of a `width` x `height` image that torchvision's resize of the
    shorter side to `resize_size` followed by a centre crop to `crop_size` keeps,
    in the image's own pixel coordinates (same rounding as torchvision)."""
    short, long = min(width, height), max(width, height)
    new_long = int(prep.resize_size * long / short)
    new_w, new_h = (prep.resize_size, new_long) if width <= height else (new_long, prep.resize_size)
    left = int(round((new_w - prep.crop_size) / 2.0))
    top = int(round((new_h - prep.crop_size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + prep.crop_size) * sx, (top + prep.crop_size) * sy


def preprocess_pixels(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """torchvision's `ImageClassification` resize and centre crop for PIL input,
    in one Pillow call that computes only the pixels the crop keeps (`resize` with
    a source box: the same filter centres and support as resize-then-crop; a few
    pixels in ten thousand differ by one level from rounding). Returns uint8 HWC.

    Plain Pillow and numpy, so decode worker processes run it without torch."""
    size = (prep.crop_size, prep.crop_size)
    image = image.resize(size, _PIL_RESAMPLING[prep.interpolation], box=center_crop_box(*image.size, prep))
    return np.array(image)


def preprocess_on_device(images: list[torch.Tensor], prep: Preprocessing) -> list[torch.Tensor]:
    """The same resize and centre crop for uint8 CHW tensors already on a device
    (JPEGs decoded there), uint8 again: images of one size are resized as one
    batch, so a chunk of camera photos costs a few kernel launches, not a few per
    image. The caller bounds the chunk in bytes (`tasks.shard.device.plan_device_chunks`):
    the resize works on a float32 copy of its input."""
    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    for index in groups.values():
        batch = torch.stack([images[i] for i in index])
        batch = TF.resize(batch, [prep.resize_size], interpolation=prep.interpolation, antialias=True)
        for i, im in zip(index, TF.center_crop(batch, [prep.crop_size]), strict=True):
            out[i] = im
    return out  # type: ignore[return-value]
