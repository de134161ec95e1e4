"""What one run did: the summary the CLI prints, the deployment's artifact
shows, and the runs log keeps (one row per run, committed or not)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from tasks.planning import RunPlan


@dataclass
class RunSummary:
    """What a run did; also the row written to the `runs` table."""

    run_id: str
    status: str  # committed | no_changes | failed
    version: int | None
    source: str
    output: str
    model: str
    weights_sha256: str
    listed: int = 0  # objects the run may read (images, documents, extension-less keys)
    skipped: int = 0  # objects of other kinds, never read
    skipped_by_extension: dict[str, int] = field(default_factory=dict)
    skipped_examples: str = ""  # `12 .txt (e.g. a.txt, b.txt)`
    counts: dict[str, int] = field(default_factory=dict)
    processed: int = 0  # objects embedded (a document counts once, whatever its pages)
    pages: int = 0  # rows embedded: one per image, one per page of a document
    failed: int = 0  # objects that failed
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    top_classes: dict[str, int] = field(default_factory=dict)
    images_per_s: float = 0.0
    elapsed_s: float = 0.0
    stage_s: dict[str, float] = field(default_factory=dict)
    batch_size: int = 0  # model batch size used (the smallest any shard ended with: halved on GPU out-of-memory)
    bottleneck: str = ""  # what held the run back, from stage_s
    shards: int = 0
    runner: str = ""  # where the shards ran: this process, or a Dask cluster
    shards_by_process: dict[str, int] = field(default_factory=dict)  # host:pid -> shards it ran
    models_built: int = 0  # most models one shard process built (1: each loaded its model once)
    started_at: str = ""
    message: str = ""

    def note_plan(self, planned: RunPlan) -> None:
        """Record what listing and planning found; a plan with nothing to do ends the run here."""
        listing = planned.listing
        self.listed, self.skipped = len(listing.images), listing.skipped_total
        self.skipped_by_extension, self.skipped_examples = listing.skipped, listing.skipped_line()
        self.counts = planned.plan.counts()
        if planned.plan.is_empty:
            self.status = "no_changes"
            self.version = planned.previous.manifest.version if planned.previous else None
            self.message = ("nothing new, changed or deleted; no new version committed" if planned.previous or
                            self.listed else f"the listing of {self.source} holds no images; nothing to catalogue "
                                             "(check the source prefix)")

    def run_row(self) -> dict:
        return {
            "run_id": self.run_id, "status": self.status, "version": self.version,
            "started_at": datetime.fromisoformat(self.started_at), "finished_at": datetime.now(UTC),
            "source": self.source, "model": self.model, "weights_sha256": self.weights_sha256,
            "listed": self.listed, "new": self.counts.get("new", 0), "changed": self.counts.get("changed", 0),
            "deleted": self.counts.get("deleted", 0), "unchanged": self.counts.get("unchanged", 0),
            "processed": self.processed, "failed": self.failed, "images_per_s": self.images_per_s,
            "elapsed_s": self.elapsed_s, **{k: self.stage_s.get(k, 0.0) for k in
                                            ("fetch_s", "decode_s", "model_s", "wait_s", "write_s", "index_s",
                                             "compile_s")},
            "message": self.message,
        }
