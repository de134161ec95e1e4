"""What the duplicates benchmarks share: pairwise precision, recall and F1 of a
grouping against the truth; the grouping before issue 28 (connected components
of the pairs), kept here only to compare with; and a sweep of both groupings over
thresholds on one set of pairs. Not a test, not part of the library.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from tasks.search import duplicates as dups


@dataclass(frozen=True)
class PairwiseScore:
    """Pairs of images put in one group, against pairs that truly are copies of one photo."""

    precision: float
    recall: float
    f1: float
    found_pairs: int  # pairs of images sharing a group
    true_pairs: int  # pairs of images sharing a photo
    correct_pairs: int
    groups: int
    largest_group: int


def pairwise_score(groups: pd.DataFrame, truth: pd.Series) -> PairwiseScore:
    """`groups` has image_id and group_id (images in no group left out); `truth` maps
    every image_id to the photo it shows. Counted by group sizes, never pair by pair."""
    def pairs(counts: pd.Series) -> int:
        c = counts.to_numpy(np.int64)
        return int((c * (c - 1) // 2).sum())

    true_pairs = pairs(truth.value_counts())
    if groups.empty:
        return PairwiseScore(1.0, 0.0 if true_pairs else 1.0, 0.0, 0, true_pairs, 0, 0, 0)
    labelled = groups[["image_id", "group_id"]].assign(photo=truth.reindex(groups["image_id"]).to_numpy())
    assert labelled["photo"].notna().all(), "every grouped image needs its photo in the truth"
    found = pairs(labelled.groupby("group_id").size())
    correct = pairs(labelled.groupby(["group_id", "photo"]).size())
    precision = correct / found if found else 1.0
    recall = correct / true_pairs if true_pairs else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    sizes = labelled.groupby("group_id").size()
    return PairwiseScore(precision, recall, f1, found, true_pairs, correct, len(sizes), int(sizes.max()))


def component_groups(pairs: dups.SimilarPairs) -> pd.DataFrame:
    """The grouping before issue 28, as it was: connected components of the pairs,
    named by their smallest image id (image_id, group_id)."""
    if not len(pairs):
        return pd.DataFrame({"image_id": np.empty(0, np.int64), "group_id": np.empty(0, np.int64)})
    nodes, ends = np.unique(np.concatenate([pairs.a, pairs.b]), return_inverse=True)
    a, b = ends[:len(pairs.a)], ends[len(pairs.a):]
    label = nodes.copy()
    while True:  # min-label propagation: each pass spreads the smallest id one hop further
        lowest = np.minimum(label[a], label[b])
        spread = label.copy()
        np.minimum.at(spread, a, lowest)
        np.minimum.at(spread, b, lowest)
        if np.array_equal(spread, label):
            break
        label = spread
    return pd.DataFrame({"image_id": nodes, "group_id": label})


def above(pairs: dups.SimilarPairs, threshold: float) -> dups.SimilarPairs:
    """The pairs a search at `threshold` returns (cosine above it), from pairs found at a lower one."""
    keep = pairs.score > threshold
    return dups.SimilarPairs(pairs.a[keep], pairs.b[keep], pairs.score[keep])


def sweep(pairs: dups.SimilarPairs, truth: pd.Series, thresholds: np.ndarray) -> list[dict]:
    """Both groupings at each threshold: one row with `old_*` (components) and `new_*` (centres) scores."""
    rows = []
    for t in thresholds:
        kept = above(pairs, float(t))
        old = pairwise_score(component_groups(kept), truth)
        new = pairwise_score(dups.centre_groups(kept), truth)
        rows.append({"threshold": float(t), "pairs": len(kept)}
                    | {f"old_{k}": v for k, v in asdict(old).items()}
                    | {f"new_{k}": v for k, v in asdict(new).items()})
    return rows


def best(rows: list[dict], grouping: str) -> dict:
    """The row where `grouping` ('old' or 'new') scores its highest F1 (the lower threshold on a tie)."""
    return max(rows, key=lambda r: (r[f"{grouping}_f1"], -r["threshold"]))


def table(rows: list[dict]) -> str:
    head = (f"{'threshold':>10} {'pairs':>7} | {'old P':>6} {'old R':>6} {'old F1':>6} {'largest':>7} | "
            f"{'new P':>6} {'new R':>6} {'new F1':>6} {'largest':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['threshold']:>10.6f} {r['pairs']:>7} | {r['old_precision']:6.3f} {r['old_recall']:6.3f} "
                     f"{r['old_f1']:6.3f} {r['old_largest_group']:>7} | {r['new_precision']:6.3f} "
                     f"{r['new_recall']:6.3f} {r['new_f1']:6.3f} {r['new_largest_group']:>7}")
    return "\n".join(lines)


def display_rows(rows: list[dict], n: int = 10) -> list[dict]:
    """A readable subset of a sweep: the rows nearest `n` thresholds evenly spaced over
    its range, and each grouping's best."""
    at = np.array([r["threshold"] for r in rows])
    picked = {int(np.abs(at - t).argmin()) for t in np.linspace(at.min(), at.max(), n)}
    picked |= {rows.index(best(rows, g)) for g in ("old", "new")}
    return [rows[i] for i in sorted(picked)]
