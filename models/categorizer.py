"""Document categories from a few labelled examples: a linear probe on the
catalogue's stored embeddings (no CNN re-run), with a confidence threshold
calibrated on a held-out split below which the answer is `uncertain`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from models.errors import UserError

UNCERTAIN = "uncertain"


class CategorizerMismatch(UserError):
    """The categoriser was trained on embeddings of another model or weights."""


@dataclass
class FitReport:
    n_train: int
    n_val: int
    accuracy: float
    majority_baseline: float  # accuracy of always answering the most common training label
    per_class: dict[str, dict[str, float]]  # label -> precision, recall, support
    confusion: list[list[int]]  # rows: true label, columns: predicted (label order of the categoriser)
    threshold: float
    uncertain_rate: float  # share of the validation split below the threshold
    accuracy_when_certain: float
    warnings: list[str] = field(default_factory=list)  # e.g. too few held-out examples to trust a class's numbers


@dataclass
class Categorizer:
    """Standardise, then a multinomial logistic regression; plain arrays, saved as JSON."""

    labels: list[str]
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]
    threshold: float
    model: str
    weights_sha256: str
    report: FitReport | None = None
    created_at: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return f"{self.model}@{self.weights_sha256}"

    def check_fits(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise CategorizerMismatch(
                f"the categoriser was trained on embeddings of {self.fingerprint[:40]}..., but this catalogue "
                f"holds {fingerprint[:40]}...; vectors of different models are not comparable. "
                "Fit a new one: batchsight categories fit --catalog OUT --labels labels.csv")

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        z = (np.asarray(embeddings, dtype=np.float32) - self.mean) / self.scale
        logits = z @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(category per row, confidence per row); below the threshold the category is `uncertain`."""
        if len(embeddings) == 0:
            return np.empty(0, dtype=object), np.empty(0, dtype=np.float32)
        p = self.probabilities(embeddings)
        best = p.argmax(axis=1)
        confidence = p[np.arange(len(p)), best].astype(np.float32)
        names = np.asarray(self.labels, dtype=object)[best]
        names[confidence < self.threshold] = UNCERTAIN
        return names, confidence

    def to_json(self) -> bytes:
        raw = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in asdict(self).items() if k != "report"}
        raw["report"] = asdict(self.report) if self.report else None
        return json.dumps(raw).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Categorizer:
        raw = json.loads(data)
        for k in ("mean", "scale", "weight", "bias"):
            raw[k] = np.asarray(raw[k], dtype=np.float32)
        raw["report"] = FitReport(**raw["report"]) if raw.get("report") else None
        return cls(**raw)


MIN_HELD_OUT = 10  # below this many held-out examples, a class's precision and recall are rough


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int,
                     groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): about `val_fraction` of each label held out, at least
    one example of each label kept for training. Rows of one group (the pages of
    one document) always land on the same side, so held-out numbers never score a
    page whose sibling was trained on."""
    rng = np.random.default_rng(seed)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    train, val = [], []
    for label in sorted(set(labels.tolist())):
        members: dict = {}
        for row in np.flatnonzero(labels == label):
            members.setdefault(groups[row], []).append(row)
        ordered = [members[g] for g in sorted(members, key=str)]
        n_val = min(len(ordered) - 1, int(round(len(ordered) * val_fraction)))
        for rank, g in enumerate(rng.permutation(len(ordered))):
            (val if rank < n_val else train).extend(ordered[g])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(val, dtype=np.int64))


def _train_probe(x: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    w = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w.T + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def calibrate_threshold(confidence: np.ndarray, correct: np.ndarray, target_precision: float) -> float:
    """The lowest confidence at which the answers at or above it are right at least
    `target_precision` of the time on the validation split; never below 0.5 (an
    answer less likely than not is never accepted)."""
    order = np.argsort(-confidence)
    conf, ok = confidence[order], correct[order].astype(np.float64)
    precision = np.cumsum(ok) / np.arange(1, len(ok) + 1)
    good = np.flatnonzero(precision >= target_precision)
    threshold = float(conf[good[-1]]) if len(good) else 1.0
    return max(0.5, threshold)


def fit_categorizer(embeddings: np.ndarray, labels: list[str] | np.ndarray, *, model: str, weights_sha256: str,
                    val_fraction: float = 0.25, target_precision: float = 0.95, l2: float = 1e-3,
                    seed: int = 0, groups: list[str] | np.ndarray | None = None) -> Categorizer:
    """Train on a stratified split, evaluate and calibrate on the held-out rest.
    `groups` names the source object of each row: a document's pages are split together."""
    labels = np.asarray(labels, dtype=object)
    names = sorted(set(labels.tolist()))
    if len(names) < 2:
        raise UserError(f"need at least two categories to learn, got {names}")
    group_of = np.arange(len(labels)) if groups is None else np.asarray(groups, dtype=object)
    counts = {n: len(set(group_of[labels == n].tolist())) for n in names}
    if min(counts.values()) < 2:
        raise UserError(f"every category needs at least 2 labelled objects (one to train, one to check); got {counts}")
    x = np.asarray(embeddings, dtype=np.float32)
    y = np.asarray([names.index(v) for v in labels], dtype=np.int64)
    train, val = stratified_split(labels, val_fraction, seed, groups=group_of)
    mean = x[train].mean(axis=0)
    scale = x[train].std(axis=0) + 1e-6  # random-init and real embeddings alike vary on very different scales per dim
    w, b = _train_probe((x[train] - mean) / scale, y[train], len(names), l2=l2, seed=seed)
    probe = Categorizer(names, mean, scale, w, b, threshold=0.0, model=model, weights_sha256=weights_sha256)
    if len(val) == 0:
        raise UserError("no examples left for validation; label more images")
    p = probe.probabilities(x[val])
    pred = p.argmax(axis=1)
    conf = p[np.arange(len(p)), pred]
    correct = pred == y[val]
    probe.threshold = calibrate_threshold(conf, correct, target_precision)
    certain = conf >= probe.threshold
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(confusion, (y[val], pred), 1)
    per_class = {}
    for i, n in enumerate(names):
        tp = confusion[i, i]
        per_class[n] = {"precision": float(tp / max(1, confusion[:, i].sum())),
                        "recall": float(tp / max(1, confusion[i].sum())), "support": int(confusion[i].sum())}
    majority = max(set(y[train].tolist()), key=y[train].tolist().count)
    probe.report = FitReport(
        n_train=len(train), n_val=len(val), accuracy=float(correct.mean()),
        majority_baseline=float((y[val] == majority).mean()), per_class=per_class, confusion=confusion.tolist(),
        threshold=probe.threshold, uncertain_rate=float(1 - certain.mean()),
        accuracy_when_certain=float(correct[certain].mean()) if certain.any() else 0.0,
        warnings=[f"{n} has {m['support']} held-out examples (fewer than {MIN_HELD_OUT}): its precision and recall "
                  "are rough; label more" for n, m in per_class.items() if m["support"] < MIN_HELD_OUT])
    return probe
