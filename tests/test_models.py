"""Registry, weights and the Embedder, with real torchvision models and weight files."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from models.engine import Embedder, cpu_supports_bf16, stack_images
from models.family import preprocess_pixels
from models.registry import model_family
from models.settings import EmbedderSettings
from models.weights import WeightsError, resolve_weights, save_random_weights, sha256_bytes
from tasks.sample_data import encode, make_document, make_product_photo
from tasks.shard.decode import decode_image


def test_unknown_model_is_named_with_suggestions():
    with pytest.raises(ValueError, match=r"unknown model 'resnet5'.*Did you mean resnet50"):
        model_family("resnet5")


def test_preprocessing_comes_from_the_weights_metadata():
    prep = model_family("resnet50").preprocessing
    assert (prep.resize_size, prep.crop_size) == (232, 224)
    assert prep.interpolation == torchvision.transforms.InterpolationMode.BILINEAR
    assert model_family("efficientnet_b0").preprocessing.interpolation.value == "bicubic"
    assert len(model_family("resnet18").labels) == 1000


@pytest.mark.parametrize("model", ["resnet50", "efficientnet_b0"])
@pytest.mark.parametrize("size", [(500, 375), (375, 500), (4000, 3000), (232, 300), (100, 60), (845, 1144)])
def test_one_pass_resize_and_crop_matches_torchvisions_transforms(model, size):
    """`preprocess_pixels` resizes only the cropped region; it must give the pixels
    of the weights' own Resize + CenterCrop (bilinear and bicubic)."""
    family = model_family(model)
    image = make_product_photo(np.random.default_rng(sum(size)), size)
    t = torchvision.models.get_model_weights(model).DEFAULT.transforms()
    ref = torchvision.transforms.v2.functional.pil_to_tensor(
        torchvision.transforms.v2.functional.center_crop(
            torchvision.transforms.v2.functional.resize(image, t.resize_size, interpolation=t.interpolation,
                                                        antialias=True), t.crop_size))
    ours = torch.from_numpy(preprocess_pixels(image, family.preprocessing)).permute(2, 0, 1)
    assert ours.shape == ref.shape == (3, t.crop_size[0], t.crop_size[0]) and ours.dtype == torch.uint8
    diff = (ours.int() - ref.int()).abs()
    # Rounding of filter positions only: mostly exact, one level at most for bilinear,
    # two for a bicubic upscale. A box off by one source pixel differs by 28-90
    # levels somewhere and by 0.4-4 levels on average.
    assert diff.max() <= 2 and diff.float().mean() < 0.2


def test_batches_are_stacked_in_channels_last_memory():
    family = model_family("resnet18")
    rng = np.random.default_rng(2)
    images = [torch.from_numpy(family.preprocess(make_product_photo(rng, (500, 375)))).permute(2, 0, 1)
              for _ in range(3)]
    batch = stack_images(images + [images[0].contiguous()])  # a plain CHW tensor too
    assert batch.shape == (4, 3, 224, 224) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch[1], images[1]) and torch.equal(batch[3], images[0])


def test_weights_file_sha256_is_recorded_and_checked(resnet18_weights):
    spec = model_family("resnet18")
    resolved = resolve_weights(str(resnet18_weights), spec)
    assert resolved.sha256 == sha256_bytes(resnet18_weights.read_bytes())
    with pytest.raises(WeightsError, match="sha256 mismatch: expected 0000.*re-download"):
        resolve_weights(str(resnet18_weights), spec, expected_sha256="0" * 64)


def test_hash_in_file_name_is_verified(tmp_path, resnet18_weights):
    renamed = tmp_path / "resnet18-deadbeef.pth"  # torch.hub naming: prefix of the sha256
    renamed.write_bytes(resnet18_weights.read_bytes())
    with pytest.raises(WeightsError, match="file name says deadbeef"):
        resolve_weights(str(renamed), model_family("resnet18"))


def test_weights_of_another_architecture_are_refused(resnet18_weights):
    settings = EmbedderSettings(model="resnet50", weights=str(resnet18_weights), device="cpu")
    with pytest.raises(WeightsError, match="do not fit resnet50.*pass the --model"):
        Embedder(settings)


def test_pickled_code_is_never_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pth"
    torch.save({"fc.weight": Evil()}, bad, _use_new_zipfile_serialization=True)
    with pytest.raises(WeightsError, match="never pickled code"):
        resolve_weights(str(bad), model_family("resnet18"))
    assert not (tmp_path / "pwned").exists()


def test_safetensors_weights_load_like_state_dicts(tmp_path, resnet18_weights):
    path = tmp_path / "r18.safetensors"
    save_random_weights("resnet18", 0, path)
    a = Embedder(EmbedderSettings(model="resnet18", weights=str(path), device="cpu", precision="fp32"))
    b = Embedder(EmbedderSettings(model="resnet18", weights=str(resnet18_weights), device="cpu", precision="fp32"))
    x = torch.randint(0, 255, (2, 3, 224, 224), dtype=torch.uint8)
    np.testing.assert_allclose(a.embed(x).embeddings, b.embed(x).embeddings, atol=1e-5)


def test_missing_weights_file_and_bad_random_spec():
    spec = model_family("resnet18")
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights("nowhere/model.pth", spec)
    with pytest.raises(WeightsError, match="random:SEED"):
        resolve_weights("random:abc", spec)
    with pytest.raises(WeightsError, match="unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        resolve_weights("IMAGENET9K", spec)


def _direct_embedding(weights_path, images):
    """The reference: torchvision's own model and transforms, fp32, no batsight code."""
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(weights_path, weights_only=True))
    model.eval()
    feats = {}

    def keep_input(_module, inputs, _output):  # returns None, so the output is untouched
        feats["x"] = inputs[0]

    model.fc.register_forward_hook(keep_input)
    transform = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    with torch.no_grad():
        logits = model(torch.stack([transform(im) for im in images]))
    emb = torch.nn.functional.normalize(feats["x"], dim=1).numpy()
    return emb, torch.softmax(logits, 1).argmax(1).numpy()


@pytest.fixture(scope="module")
def reference_images():
    rng = np.random.default_rng(5)
    return [encode(make_product_photo(rng, (500, 375)), "JPEG"), encode(make_document(rng, "invoice"), "PNG"),
            encode(make_product_photo(rng, (375, 500)), "PNG")]


def test_pipeline_embedding_equals_direct_model_call(resnet18_weights, reference_images):
    emb = Embedder(EmbedderSettings(model="resnet18", weights=str(resnet18_weights), device="cpu", precision="fp32"))
    decoded = [decode_image(d, min_side=emb.family.preprocessing.resize_size).image for d in reference_images]
    ours = emb.embed(torch.stack([emb.preprocess(im) for im in decoded]))
    full = [Image.open(io.BytesIO(d)).convert("RGB") for d in reference_images]
    ref, ref_top = _direct_embedding(resnet18_weights, full)
    np.testing.assert_allclose(ours.embeddings, ref, atol=1e-4)
    np.testing.assert_array_equal(ours.class_ids[:, 0], ref_top)
    np.testing.assert_allclose(np.linalg.norm(ours.embeddings, axis=1), 1.0, atol=1e-5)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16 (AVX-512 BF16 / AMX)")
def test_bf16_embeddings_agree_with_fp32(resnet18_weights, reference_images):
    settings = dict(model="resnet18", weights=str(resnet18_weights), device="cpu")
    fp32 = Embedder(EmbedderSettings(**settings, precision="fp32"))
    bf16 = Embedder(EmbedderSettings(**settings, precision="bf16"))
    assert bf16.dtype == torch.bfloat16
    x = torch.stack([fp32.preprocess(decode_image(d).image) for d in reference_images])
    a, b = fp32.embed(x).embeddings, bf16.embed(x).embeddings
    cosine = (a * b).sum(1)
    assert cosine.min() >= 0.99, cosine


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the refusal only applies without one")
    with pytest.raises(ValueError, match="no CUDA GPU is visible; use --device cpu"):
        Embedder(EmbedderSettings(model="resnet18", weights="random:0", device="cuda"))


def test_models_import_nothing_from_tasks_or_flows():
    """The model layer takes weights as a file or bytes; stores, catalogues and
    flows sit above it (weights at s3:// reach it through tasks.storage.url_reader)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "models"
    offenders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("tasks", "flows", "deployments")]
    assert offenders == []


def test_weights_at_s3_are_read_through_the_store_and_checked(new_bucket, s3, moto_endpoint, resnet18_weights):
    from tasks.storage import url_reader

    bucket = new_bucket()
    s3.put_object(Bucket=bucket, Key="models/resnet18-random.pth", Body=resnet18_weights.read_bytes())
    url = f"s3://{bucket}/models/resnet18-random.pth"
    spec = model_family("resnet18")
    local = resolve_weights(str(resnet18_weights), spec)
    remote = resolve_weights(url, spec, read=url_reader(moto_endpoint), expected_sha256=local.sha256)
    assert remote.source == "s3" and remote.sha256 == local.sha256
    assert set(remote.state_dict) == set(local.state_dict)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve_weights(url, spec, read=url_reader(moto_endpoint), expected_sha256="0" * 64)
    with pytest.raises(WeightsError, match="at a URL"):
        resolve_weights(url, spec)
