"""What one run did: the summary the CLI prints, the deployment's artifact
shows, and the runs log keeps (one row per run, committed or not).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tasks.catalog.versions import BuildStats
from tasks.records import ShardResult, StageTimes
from tasks.source.planning import RunPlan


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
    processed: int = 0  # objects catalogued this run (a document counts once, whatever its pages)
    reused: int = 0  # of them, objects whose bytes were embedded before: their vectors reused, no model pass
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

    def note_shards(self, results: list[ShardResult], *, runner: str, wall_s: float, cluster_start_s: float,
                    ready_at: float, compile_s: float, build: BuildStats, batch_size: int | None) -> None:
        """Record what the shards did: objects, pages, failures by reason, classes,
        stage times summed over shards (and the build's), throughput over the
        shards' wall time, where they ran, and what held them back."""
        times = StageTimes()
        for r in results:
            times.add(StageTimes(**{k: r.times[f"{k}_s"] for k in ("fetch", "decode", "model", "wait")}))
        self.batch_size = min((int(r.times["batch_size"]) for r in results), default=batch_size or 0)
        first_batch = [r.times["first_batch_at"] for r in results if r.times.get("first_batch_at")]
        self.stage_s = times.as_dict() | {
            "write_s": sum(r.times["write_s"] for r in results) + build.write_s,
            "index_s": build.index_s,
            "compile_s": compile_s,
            "load_s": sum(r.times.get("load_s", 0.0) for r in results),  # model loads in the shards' processes
            "cluster_start_s": cluster_start_s,  # starting or reaching a Dask cluster
        } | ({"to_first_batch_s": min(first_batch) - ready_at} if first_batch else {})
        self.shards, self.runner = len(results), runner
        self.shards_by_process = dict(Counter(r.ran_on for r in results))
        self.models_built = max((r.model_loads for r in results), default=0)
        self.pages = sum(len(r.rows) for r in results)
        self.processed = len({k for r in results for k in r.rows["key"]})
        self.reused = sum(r.copied for r in results)
        failures = [f for r in results for f in r.failures]
        self.failed = len({f["key"] for f in failures})
        self.failures_by_reason = dict(Counter(f"{f['stage']}:{f['error_type']}" for f in failures).most_common())
        self.top_classes = dict(Counter(c for r in results for c in r.rows["top_class"]).most_common(10))
        self.images_per_s = (self.processed + self.failed) / wall_s if wall_s > 0 else 0.0
        shard_s = sum(r.times["ended_at"] - r.times["started_at"] - r.times.get("load_s", 0.0) for r in results)
        self.bottleneck = bottleneck(self.stage_s, shard_s) if self.processed + self.failed else ""

    def note_commit(self, version: int) -> None:
        self.status, self.version, self.message = "committed", version, f"committed version {version}"

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


INPUT_BOUND_WAIT = 0.2  # batching idle this share of the time: the inputs are the wall

SHARD_BOUND_MODEL = 0.5  # the model busy less than this share, batching not idle: the shard's process is the wall


def bottleneck(stage_s: dict[str, float], shard_s: float) -> str:
    """One line that tells an operator what held a run back, from its stage times
    and its shards' own seconds (`shard_s`: each shard's wall time, summed, so
    shards running side by side on several workers count once each)."""
    if shard_s <= 0:
        return ""
    waited = min(1.0, stage_s.get("wait_s", 0.0) / shard_s)
    if waited >= INPUT_BOUND_WAIT:
        slower = "fetch" if stage_s.get("fetch_s", 0.0) > stage_s.get("decode_s", 0.0) else "decode"
        return (f"input: batches waited for images {waited:.0%} of the time, mostly in {slower}; raise --io-workers"
                + (", or move the catalogue job closer to the bucket" if slower == "fetch" else
                   ", add cores, or use --gpu-decode on a GPU"))
    busy = stage_s.get("model_s", 0.0) / shard_s
    if busy < SHARD_BOUND_MODEL:
        # Neither waiting for images nor in the model: the shard's one process
        # (batching, device decode calls, rows and parts) is what a GPU waits on.
        return (f"shard process: the model was busy {busy:.0%} of the time and batches waited for images "
                f"{waited:.0%}; the rest went to batching and writing in the shard's one process: run several "
                "shard processes (--workers N, also on one GPU)")
    return (f"model: it ran all the time (batches waited for images {waited:.0%} of the time); a GPU, "
            "--compile on or a smaller model is what goes faster")
