"""A second model family through the whole embedding path.

`PatchMeans` is a family that is not torchvision's: its own preprocessing (a
32-pixel crop), its own network (no ImageNet head: 3 labels of its own), its own
embedding size (96). Registered by name, it runs a real catalogue run, answers
a search by image file (the query path), and its vectors are those of its
network on its own preprocessing: nothing in the runs, search or catalogue knows
torchvision's classifiers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from flows.search import similar_images
from models.errors import WeightsError
from models.family import ModelFamily, Preprocessing, PublishedWeights
from models.registry import model_family, register_family
from models.weights import resolve_weights, save_random_weights
from tasks.catalog.reader import Catalog
from tasks.sample_data import write_samples
from tasks.shard.decode import decode_image
from tasks.storage import LocalStore, cached_store
from tests.helpers import run_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 24, 4, stride=4), torch.nn.ReLU(),
                                        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
        self.head = torch.nn.Linear(96, 3)


class _FeaturesAndLogits(torch.nn.Module):
    def __init__(self, tiny: _Tiny) -> None:
        super().__init__()
        self.tiny = tiny

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.tiny.body(x)
        return features, self.tiny.head(features)


@dataclass(frozen=True)
class PatchMeans(ModelFamily):
    name: str = "test-patch-means"
    preprocessing: Preprocessing = field(default_factory=lambda: Preprocessing(
        resize_size=40, crop_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))

    @property
    def labels(self) -> tuple[str, ...]:
        return ("dark", "mid", "light")

    def module(self) -> torch.nn.Module:
        return _Tiny()

    def network(self, module: torch.nn.Module) -> torch.nn.Module:
        return _FeaturesAndLogits(module)

    def published_weights(self, name: str) -> PublishedWeights:
        raise WeightsError(f"{self.name} publishes no weights; pass --weights PATH")


@pytest.fixture(scope="module")
def family():
    family = PatchMeans()
    register_family(family)
    return family


def test_a_family_registered_by_name_gives_its_own_size_labels_and_fingerprint(family, tmp_path):
    assert model_family("test-patch-means") is family
    assert family.dim == 96
    sha = save_random_weights(family.name, 0, tmp_path / "tiny.pth")
    assert resolve_weights(str(tmp_path / "tiny.pth"), family).sha256 == sha
    assert family.fingerprint(sha) == f"test-patch-means@{sha}"
    with pytest.raises(WeightsError, match="publishes no weights"):
        resolve_weights(None, family)


def test_a_second_family_runs_catalogues_and_searches(family, tmp_path, samples):
    weights = tmp_path / "tiny.pth"
    sha = save_random_weights(family.name, 1, weights)
    source, output = tmp_path / "src", tmp_path / "out"
    write_samples(LocalStore(source, create=True), samples)
    summary = run_flow(source=str(source), output=str(output), model=family.name, weights=str(weights),
                             precision="fp32", batch_size=8, shard_size=20)
    assert summary.status == "committed"
    cat = Catalog.open(cached_store(str(output), None))
    assert cat.manifest.fingerprint == f"test-patch-means@{sha}" and cat.manifest.embedding_dim == 96
    images = cat.images.set_index("key")
    assert set(images["top_class"]) <= set(family.labels) and set(images["model"]) == {family.name}

    # The run's vector of a photo is the family's network on the family's preprocessing.
    photo = next(s for s in samples if s.kind == "product" and s.key.endswith(".jpg"))
    net = family.network(family.module()).eval()
    net.load_state_dict({f"tiny.{k}": v for k, v in torch.load(weights, weights_only=True).items()})
    pixels = torch.from_numpy(family.preprocess(decode_image(photo.data, min_side=40).image)).permute(2, 0, 1)
    x = (pixels[None].float() / 255 - 0.5) / 0.25
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(net(x)[0], dim=1).numpy()[0]
    ids, vectors = cat.embeddings()
    row = vectors[np.flatnonzero(ids == images.loc[photo.key, "image_id"])[0]]
    np.testing.assert_allclose(row, expected, atol=1e-4)

    # A query by image file goes through the same family: the photo finds itself first.
    found = similar_images(cat, image=photo.data, k=3)
    assert found["key"].iloc[0] == photo.key and found["score"].iloc[0] > 0.99
