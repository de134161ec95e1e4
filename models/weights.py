"""Resolve `--weights`: a model family's published weights by name (torchvision's
`IMAGENET1K_V2`, `DEFAULT`), a file, an `s3://` key, or `random:SEED` (smoke
tests and the demo only; never chosen silently).

Files are loaded with `torch.load(weights_only=True)` or safetensors, so weights
are never unpickled as code, and their sha256 is recorded in every manifest.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from models.errors import WeightsError
from models.family import ModelFamily
from models.registry import model_family

# torch.hub's convention: `resnet50-11ad3fa6.pth` carries a prefix of its sha256.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.(?:pth|pt|safetensors)$")


@dataclass(frozen=True)
class ResolvedWeights:
    spec: str  # exactly what the user passed
    source: str  # published | file | s3 | random
    sha256: str
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    seed: int | None = None

    @property
    def is_random(self) -> bool:
        return self.source == "random"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_random_spec(spec: str) -> int | None:
    if not spec.startswith("random:"):
        return None
    try:
        return int(spec.split(":", 1)[1])
    except ValueError:
        raise WeightsError(f"bad weights spec {spec!r}: random weights are written random:SEED, e.g. random:0") from None


# The last weights this process resolved from a file, keyed by the file's path,
# size and mtime: the CLI's check, the flow and the model building in one process
# read and hash a 100 MB file once, and a file replaced between nightly runs of a
# long-lived server is read again.
_last_file: tuple[tuple, ResolvedWeights] | None = None


def resolve_weights(spec: str | None, model: ModelFamily, *, expected_sha256: str | None = None,
                    read: Callable[[str], bytes] | None = None) -> ResolvedWeights:
    """Turn a `--weights` value into a state dict plus its sha256.

    `None` means the family's default published weights (downloaded into the
    torch hub cache on first use). Weights at a URL (`s3://bucket/key`) come as
    bytes from `read(url)`, which the caller supplies (`tasks.storage.url_reader`):
    this package knows files and bytes, not object stores.
    """
    global _last_file
    spec = spec or "DEFAULT"
    seed = parse_random_spec(spec)
    if seed is not None:
        resolved = ResolvedWeights(spec, "random", sha256_bytes(f"random:{seed}:{model.name}".encode()), seed=seed)
        _check_sha(spec, spec, resolved.sha256, expected_sha256)
        return resolved
    if "://" in spec:
        if read is None:
            raise WeightsError(f"weights {spec} are at a URL and nothing was given to read it; pass a local file, "
                               "or call with read=tasks.storage.url_reader(...)")
        return _from_bytes(spec, spec.split("://", 1)[0], read(spec), spec.rsplit("/", 1)[-1], expected_sha256)
    path = Path(spec).expanduser()
    if path.suffix in (".pth", ".pt", ".safetensors", ".bin") or path.exists():
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist; pass an existing file, an s3:// key, "
                               "or a torchvision weights name such as IMAGENET1K_V2")
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, model.name)
        if _last_file is not None and _last_file[0] == key:
            _check_sha(spec, path.name, _last_file[1].sha256, expected_sha256)
            return replace(_last_file[1], spec=spec)
        resolved = _from_bytes(spec, "file", path.read_bytes(), path.name, expected_sha256)
        _last_file = (key, resolved)
        return resolved
    return _published(spec, model, expected_sha256)


def _check_sha(spec: str, name: str, actual: str, expected: str | None) -> None:
    if expected and actual != expected.lower():
        raise WeightsError(f"weights {spec} sha256 mismatch: expected {expected}, got {actual}; "
                           "re-download the file or pass the right --weights-sha256")
    m = _HASH_IN_NAME.search(name)
    if m and not actual.startswith(m.group(1)):
        raise WeightsError(f"weights {spec} sha256 mismatch: the file name says {m.group(1)}..., the content "
                           f"hashes to {actual}; the file is corrupt or renamed, re-download it")


def _from_bytes(spec: str, source: str, data: bytes, name: str, expected: str | None) -> ResolvedWeights:
    digest = sha256_bytes(data)
    _check_sha(spec, name, digest, expected)
    if name.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        try:
            state = load_safetensors(data)
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise WeightsError(f"weights {spec} is not a valid safetensors file: {exc}") from None
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            raise WeightsError(
                f"weights {spec} could not be loaded safely ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                "batchsight loads only plain state dicts (torch.save(model.state_dict())) or safetensors, "
                "never pickled code"
            ) from None
    state = _unwrap_checkpoint(state, spec)
    _check_finite(state, spec)
    return ResolvedWeights(spec, source, digest, state_dict=state)


def _check_finite(state: dict[str, torch.Tensor], spec: str) -> None:
    """Refuse weights holding NaN or infinity: every embedding would be NaN, and a
    version of them would commit and find nothing."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(f"weights {spec} hold NaN or infinite values in {len(bad)} tensors (e.g. "
                           f"{', '.join(bad[:3])}); the file is corrupt or the training diverged: pass other weights")


def _unwrap_checkpoint(obj: object, spec: str) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or the common {'state_dict': ...} / {'model': ...} checkpoint."""
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict):
                obj = inner
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return {k.removeprefix("module."): v for k, v in obj.items()}
    raise WeightsError(f"weights {spec} holds no state dict of tensors; save it with torch.save(model.state_dict(), PATH)")


def _published(spec: str, model: ModelFamily, expected: str | None) -> ResolvedWeights:
    weights = model.published_weights(spec)
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        if not hub_file.exists():
            hub_file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(hub_file), progress=True)
    except Exception as exc:  # urllib raises a zoo of network errors
        raise WeightsError(
            f"could not download {weights.spec} from {weights.url} ({type(exc).__name__}: {exc}); "
            "on a machine without internet, copy the file there and pass --weights PATH or an s3:// key"
        ) from None
    return _from_bytes(weights.spec, "published", hub_file.read_bytes(), hub_file.name, expected)


def apply_weights(module: torch.nn.Module, weights: ResolvedWeights, model_name: str) -> None:
    """Load `weights` into `module` strictly; a mismatch names the keys that do not fit."""
    if weights.state_dict is None:
        return
    result = _load_strict(module, weights.state_dict)
    if result:
        raise WeightsError(f"weights {weights.spec} do not fit {model_name}: {result}; "
                           "pass the --model these weights were trained for")


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:2])})")
        return ", ".join(parts)
    module.load_state_dict(state, strict=True)
    return None


def save_random_weights(model_name: str, seed: int, path: str | Path) -> str:
    """Write seeded random weights for `model_name` to `path` (for tests and the demo)
    and return their sha256."""
    torch.manual_seed(seed)
    module = model_family(model_name).module()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    else:
        torch.save(module.state_dict(), path)
    return sha256_bytes(path.read_bytes())
