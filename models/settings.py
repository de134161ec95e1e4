"""Which model runs and how, as plain data: light enough for the run
configuration and the command line to import without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from models.errors import UserError

COMPILE_MODES = ("auto", "on", "off")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class EmbedderSettings:
    """Everything that decides which model runs and how; hashable, so one Embedder
    per distinct settings is cached per process."""

    model: str  # a name `models.registry` knows (the run's default lives in tasks.config)
    weights: str | None = None
    weights_sha256: str | None = None
    device: str = "auto"
    precision: str = "auto"
    top_k: int = 5

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise UserError(f"unknown device {self.device!r}: use one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if not 1 <= self.top_k <= 20:
            raise UserError(f"top_k must be between 1 and 20, not {self.top_k}")
