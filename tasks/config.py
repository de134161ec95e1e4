"""The run configuration: every option of a run, declared once with its bounds
and help, in groups (model, decode, shards, index, safety).

`RunConfig` is what `batchsight run` and `batchsight serve` build from their
flags (flows/cli/options.py makes a flag of each field), and the one parameter
of the `catalog_images` flow and of its deployment: Prefect validates it against
these bounds, so a deployment's parameter out of bounds is refused before a run
starts. Each stage's settings are derived from it here, in one place
(`embedder_settings`, `decode_options`, `index_settings`); the environment
variables that stand for options are read here too, once (`with_environment`).
A default is owned by the module whose setting it is, and read from there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.errors import UserError
from models.settings import COMPILE_MODES, DEVICES, PRECISIONS, EmbedderSettings
from tasks.search.index_choice import DEFAULT_RECALL_TARGET, IndexSettings, parse_memory_size
from tasks.shard.decode import DECODE_IN, DEFAULT_MAX_PAGES, DEFAULT_PDF_DPI, DecodeOptions
from tasks.shard.thumbnails import THUMBNAIL_SIDE
from tasks.storage import ENDPOINT_ENV, check_roots_apart, resolved_endpoint

# Environment variables that stand for an option, read only by `RunConfig.with_environment`.
CLUSTER_ENV = "BATCHSIGHT_DASK_CLUSTER"
INDEX_MEMORY_ENV = "BATCHSIGHT_INDEX_MEMORY"
DEFAULT_SHARD_SIZE = 2000
DEFAULT_MODEL = "resnet50"
DEFAULT_MAX_ATTEMPTS = 3  # tries of an image that failed to fetch or embed
DEFAULT_MAX_DELETE_SHARE = 0.2  # of the catalogue a run may delete without --allow-mass-delete


class ConfigError(UserError):
    """Run options that are out of bounds or do not fit together; the message names each flag."""


class RunnerError(UserError):
    """A --cluster / --workers choice that cannot work; the message says what to do."""


def option(default: Any, help: str, *, flag: str | None = None, env: str | None = None, **bounds: Any) -> Any:
    """A config field: its default, bounds and help, plus the CLI flag that sets it
    (default: `--field-name`) and the environment variable that stands for it."""
    extra = {k: v for k, v in (("flag", flag), ("env", env)) if v}
    return Field(default, description=help, json_schema_extra=extra or None, **bounds)


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Group):
    """Which model embeds the images, and how it runs."""

    name: str = option(DEFAULT_MODEL, "torchvision classification model name.", flag="--model")
    weights: str | None = option(None, "torchvision weights name (default: the model's DEFAULT), a file "
                                       "(.pth/.safetensors), an s3:// key, or random:SEED (smoke tests only).")
    weights_sha256: str | None = option(None, "Expected sha256 of the weights file.", pattern=r"^[0-9a-fA-F]{64}$")
    device: Literal[DEVICES] = option("auto", "Where the model runs.")  # type: ignore[valid-type]
    precision: Literal[PRECISIONS] = option(  # type: ignore[valid-type]
        "auto", "auto = bf16 on GPUs and bf16-capable CPUs, else fp32.")
    batch_size: int | None = option(None, "Images per model batch (default: 16 on CPU, what fits on a GPU).",
                                    ge=1, le=4096)
    compile: Literal[COMPILE_MODES] = option(  # type: ignore[valid-type]
        "auto", "torch.compile the model: auto = when the run has 3,000+ images (compiling takes 10-20 s, then "
                "~1.6x on CPU).")


class DecodeConfig(_Group):
    """How objects become model inputs."""

    gpu_decode: bool = option(False, "Decode JPEGs on the GPU (nvJPEG).", flag="--gpu-decode")
    io_workers: int | None = option(None, "Fetch/decode threads per shard (default: twice the cores, at least 4).",
                                    ge=1, le=256)
    decode_in: Literal[DECODE_IN] = option(  # type: ignore[valid-type]
        "auto", "Where CPU decoding runs: auto = worker processes on a GPU machine or from 4 cores, else threads.")
    pdf_dpi: int = option(DEFAULT_PDF_DPI, "Resolution PDF pages are rendered at.", ge=36, le=600)
    max_pages: int = option(DEFAULT_MAX_PAGES, "Pages read from one PDF or TIFF at most.", ge=1, le=10_000)
    thumbnails: bool = option(True, "Make 160 px thumbnails while decoding, for the web page (~1.1 ms of CPU an "
                                     "image).", flag="--thumbnails/--no-thumbnails")


class ShardConfig(_Group):
    """How the work is cut into shards, and where the shards run: in this process
    (neither `workers` nor `cluster`), on a local Dask cluster of `workers`
    processes, or on the running Dask cluster at `cluster` (flows/runners.py)."""

    shard_size: int = option(DEFAULT_SHARD_SIZE, "Images per Prefect task (with --workers N, smaller where the "
                                                 "workers would get fewer than 2 shards each).", ge=1, le=1_000_000)
    limit: int | None = option(None, "Process at most this many images this run.", ge=1)
    workers: int | None = option(None, "Run the shards on a local Dask cluster of this many worker processes; on a "
                                       "GPU machine a multiple of the GPUs, several shard processes feeding each "
                                       "card. Default: in this process.", ge=1, le=256)
    cluster: str | None = option(None, "Run the shards on the Dask cluster whose scheduler is at this address "
                                       "(tcp://HOST:8786; also BATCHSIGHT_DASK_CLUSTER); see docs/operations.md.",
                                 env=CLUSTER_ENV)

    @model_validator(mode="after")
    def _one_place(self) -> ShardConfig:
        if self.cluster and self.workers:
            raise RunnerError("pass --cluster ADDRESS (a running Dask cluster) or --workers N (a local one), not both")
        if self.cluster:
            scheduler_address(self.cluster)
        return self

    @property
    def in_process(self) -> bool:
        return not self.cluster and not self.workers

    def describe(self) -> str:
        if self.cluster:
            return f"the Dask cluster at {self.cluster}"
        if self.workers:
            return f"a local Dask cluster of {self.workers} worker processes"
        return "this process"


def scheduler_address(cluster: str) -> tuple[str, int]:
    """(host, port) of a Dask scheduler address such as tcp://10.0.0.5:8786."""
    parsed = urlparse(cluster if "://" in cluster else f"tcp://{cluster}")
    if parsed.scheme not in ("tcp", "tls") or not parsed.hostname:
        raise RunnerError(f"--cluster {cluster!r} is not a Dask scheduler address; write it as tcp://HOST:8786")
    return parsed.hostname, parsed.port or 8786


class IndexConfig(_Group):
    """How the FAISS index is chosen and tuned."""

    memory: str | None = option(None, "Memory the FAISS index may use, e.g. 8GiB (default: half of RAM); decides "
                                      "flat, IVF-Flat or IVF-PQ (also BATCHSIGHT_INDEX_MEMORY).", flag="--index-memory",
                                env=INDEX_MEMORY_ENV)
    recall_target: float = option(DEFAULT_RECALL_TARGET, "recall@10 the search setting (nprobe) is tuned to reach.",
                                  ge=0.5, le=1.0)

    @field_validator("memory")
    @classmethod
    def _a_size(cls, value: str | None) -> str | None:
        if value is not None and parse_memory_size(value) <= 0:
            raise ValueError(f"index memory {value!r} must be more than 0 bytes")
        return value

    def with_environment(self, environ: Mapping[str, str] | None = None) -> IndexConfig:
        """`memory` from `BATCHSIGHT_INDEX_MEMORY` where no flag set it."""
        env = os.environ if environ is None else environ
        if self.memory is None and env.get(INDEX_MEMORY_ENV):
            try:
                return IndexConfig(memory=env[INDEX_MEMORY_ENV], recall_target=self.recall_target)
            except ValidationError as exc:
                raise ConfigError(f"${INDEX_MEMORY_ENV}: {describe_errors(exc)}") from None
        return self

    def settings(self) -> IndexSettings:
        return IndexSettings(memory_budget_bytes=parse_memory_size(self.memory) if self.memory else None,
                             recall_target=self.recall_target)


class SafetyConfig(_Group):
    """What a run refuses to do without being told."""

    max_attempts: int = option(DEFAULT_MAX_ATTEMPTS, "Tries of an image that failed to fetch or embed before it "
                                                     "is left until its bytes change.", ge=1, le=100)
    max_delete_share: float = option(DEFAULT_MAX_DELETE_SHARE, "Refuse a run that would delete more than this share "
                                                               "of the catalogue (a typo'd prefix lists nothing).",
                                     ge=0.0, le=1.0)
    allow_mass_delete: bool = option(False, "Commit the deletions even past --max-delete-share (an emptied bucket, "
                                            "a big clean-up).", flag="--allow-mass-delete")


class RunConfig(BaseModel):
    """One run: where from, where to, and every option, grouped."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = option(..., "Images to catalogue: a folder or s3://bucket/prefix.", min_length=1)
    output: str = option(..., "Catalogue root: a folder or s3://bucket/prefix.", min_length=1)
    endpoint_url: str | None = option(None, "S3-compatible endpoint (also AWS_ENDPOINT_URL).", env=ENDPOINT_ENV)
    seed: str | None = option(None, "A catalogue made with the same model and weights whose vectors are reused for "
                                    "objects with the same bytes (a copied or moved bucket): they are fetched and "
                                    "hashed, never decoded or embedded.")
    model: ModelConfig = ModelConfig()
    decode: DecodeConfig = DecodeConfig()
    shards: ShardConfig = ShardConfig()
    index: IndexConfig = IndexConfig()
    safety: SafetyConfig = SafetyConfig()

    @model_validator(mode="after")
    def _roots_apart(self) -> RunConfig:
        check_roots_apart(self.source, self.output)
        return self

    def with_environment(self, environ: Mapping[str, str] | None = None) -> RunConfig:
        """This config with the options left unset taken from the environment
        (`AWS_ENDPOINT_URL` through `tasks.storage.resolved_endpoint`,
        `BATCHSIGHT_DASK_CLUSTER` where neither --cluster nor --workers is given,
        `BATCHSIGHT_INDEX_MEMORY`): flags win over variables."""
        env = os.environ if environ is None else environ
        update: dict[str, Any] = {}
        if self.endpoint_url is None and (endpoint := resolved_endpoint(None)):
            update["endpoint_url"] = endpoint  # so Dask workers elsewhere reach the same store
        if self.shards.in_process and env.get(CLUSTER_ENV):
            update["shards"] = self.shards.model_dump() | {"cluster": env[CLUSTER_ENV]}
        if (index := self.index.with_environment(env)) is not self.index:
            update["index"] = index
        # model_validate again: a value from the environment is checked like a flag
        return validated(self.model_dump() | {k: v.model_dump() if isinstance(v, BaseModel) else v
                                              for k, v in update.items()}) if update else self

    def embedder_settings(self, weights_sha256: str | None = None) -> EmbedderSettings:
        m = self.model
        return EmbedderSettings(model=m.name, weights=m.weights, weights_sha256=weights_sha256 or m.weights_sha256,
                                device=m.device, precision=m.precision)

    def decode_options(self) -> DecodeOptions:
        d = self.decode
        return DecodeOptions(on_device=d.gpu_decode, pdf_dpi=d.pdf_dpi, max_pages=d.max_pages, decode_in=d.decode_in,
                             thumbnail_side=THUMBNAIL_SIDE if d.thumbnails else 0)

    def index_settings(self) -> IndexSettings:
        return self.index.settings()


def config_fields() -> list[tuple[str | None, str, Any]]:
    """(group or None, field name, pydantic FieldInfo) of every option, in declaration order."""
    out = []
    for name, field in RunConfig.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, _Group):
            out += [(name, sub, info) for sub, info in kind.model_fields.items()]
        else:
            out.append((None, name, field))
    return out


def flag_of(group: str | None, name: str, info: Any) -> str:
    """The CLI flag that sets a field: `--model` for model.name, `--index-memory`, ..."""
    extra = info.json_schema_extra or {}
    return extra.get("flag") or "--" + name.replace("_", "-")


def flat_name(group: str | None, name: str, info: Any) -> str:
    """The field's name as a flat keyword (its flag without dashes): `index_memory`, `thumbnails`."""
    return flag_of(group, name, info).split("/")[0].removeprefix("--").replace("-", "_")


FLAT_NAMES = {flat_name(*f): f[:2] for f in config_fields()}  # flat keyword -> (group, field)


def config_from_flat(**options: Any) -> RunConfig:
    """A RunConfig from flat keywords, as the CLI's flags name them (`model`,
    `batch_size`, `index_memory`, `workers`, ...); None leaves an option at its default."""
    unknown = sorted(set(options) - set(FLAT_NAMES))
    if unknown:
        raise UserError(f"unknown run option(s) {', '.join(unknown)}; the options are {', '.join(sorted(FLAT_NAMES))}")
    data: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        group, name = FLAT_NAMES[key]
        (data.setdefault(group, {}) if group else data)[name] = value
    return validated(data)


def validated(data: dict[str, Any]) -> RunConfig:
    """`RunConfig.model_validate`, with every problem as one `ConfigError` line that names the flag."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc)) from None


def describe_errors(exc: ValidationError) -> str:
    """`--batch-size 0: Input should be greater than or equal to 1; ...`, the flags as a person typed them."""
    flags = {(g, n): flag_of(g, n, info).split("/")[0] for g, n, info in config_fields()}
    lines = []
    for error in exc.errors():
        loc = tuple(str(p) for p in error["loc"])
        where = flags.get((loc[0], loc[1]) if len(loc) > 1 else (None, loc[0])) if loc else None
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{where} {error['input']!r}: {message}" if where and "input" in error and
                     not isinstance(error["input"], dict) else message)
    return "; ".join(lines)
