"""A shard's model inputs, column by column: what the read stage hands the
embed stage, and how it is cut into model batches.

An input is one page of one object: decoded on a CPU into model-sized pixels, or
a JPEG left raw for the model's device to decode. Inputs travel in `Inputs`
(pages decoded, JPEGs raw, and the failures met on the way), arrays and lists
per column, so the shard's own process spends its time per batch, not per image.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from tasks.records import ImageFailure, ObjectInfo


@dataclass
class Pages:
    """Inputs of one kind, in order: each one's object, page number, original size,
    whether it is its object's last page, and its thumbnail (WebP, where made);
    then the pixels (uint8 [k, S, S, 3] segments, summing to the inputs, for pages
    decoded on a CPU) or the bytes (raw JPEGs for the device), never both."""

    infos: list[ObjectInfo] = field(default_factory=list)
    page: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    size: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.int32))  # (width, height)
    last: np.ndarray = field(default_factory=lambda: np.empty(0, bool))
    thumbnails: list[bytes | None] = field(default_factory=list)
    pixels: list[np.ndarray] = field(default_factory=list)
    jpegs: list[bytes] = field(default_factory=list)
    content: list[str] = field(default_factory=list)  # sha256 of each input's object's bytes

    def __len__(self) -> int:
        return len(self.infos)

    @classmethod
    def of(cls, infos: list[ObjectInfo], page: Sequence[int], size: Sequence[tuple[int, int]], last: Sequence[bool],
           thumbnails: list[bytes | None], content: list[str], *, pixels: np.ndarray | None = None,
           jpegs: list[bytes] | None = None) -> Pages:
        return cls(infos, np.asarray(page, np.int32), np.asarray(size, np.int32).reshape(-1, 2),
                   np.asarray(last, bool), thumbnails, [pixels] if pixels is not None and len(pixels) else [],
                   jpegs or [], content)

    @classmethod
    def concat(cls, parts: Sequence[Pages]) -> Pages:
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls()
        return cls([i for p in parts for i in p.infos], np.concatenate([p.page for p in parts]),
                   np.concatenate([p.size for p in parts]), np.concatenate([p.last for p in parts]),
                   [t for p in parts for t in p.thumbnails], [s for p in parts for s in p.pixels],
                   [j for p in parts for j in p.jpegs], [c for p in parts for c in p.content])

    def split(self, n: int) -> tuple[Pages, Pages]:
        """The first `n` inputs and the rest (pixel segments are cut as views, not copied)."""
        if n >= len(self):
            return self, Pages()
        head, tail, at = [], [], 0
        for segment in self.pixels:
            if at + len(segment) <= n:
                head.append(segment)
            elif at >= n:
                tail.append(segment)
            else:
                head.append(segment[:n - at])
                tail.append(segment[n - at:])
            at += len(segment)
        return (Pages(self.infos[:n], self.page[:n], self.size[:n], self.last[:n], self.thumbnails[:n], head,
                      self.jpegs[:n], self.content[:n]),
                Pages(self.infos[n:], self.page[n:], self.size[n:], self.last[n:], self.thumbnails[n:], tail,
                      self.jpegs[n:], self.content[n:]))

    def take(self, keep: np.ndarray) -> Pages:
        """The inputs where `keep` (bool) is true, metadata only (no pixels or bytes)."""
        index = np.flatnonzero(keep)
        return Pages([self.infos[i] for i in index], self.page[index], self.size[index], self.last[index],
                     [self.thumbnails[i] for i in index], content=[self.content[i] for i in index])

    def select(self, keep: np.ndarray) -> Pages:
        """The inputs where `keep` (bool) is true, with their pixels or bytes."""
        if keep.all():
            return self
        out = self.take(keep)
        if self.pixels:
            out.pixels = [self.pixel_array()[keep]] if keep.any() else []
        out.jpegs = [j for j, k in zip(self.jpegs, keep, strict=False) if k]
        return out

    def pixel_array(self) -> np.ndarray:
        """The pixels as one array (a copy when there are several segments)."""
        return self.pixels[0] if len(self.pixels) == 1 else np.concatenate(self.pixels)


@dataclass
class Inputs:
    """Model inputs of some objects: pages decoded on a CPU, JPEGs for the device,
    and the objects that failed on the way (fetch or decode)."""

    decoded: Pages = field(default_factory=Pages)
    raw: Pages = field(default_factory=Pages)
    failures: list[ImageFailure] = field(default_factory=list)
    copies: Pages = field(default_factory=Pages)  # objects whose bytes were seen before: no decode, no model (metadata)
    fetch_s: float = 0.0
    decode_s: float = 0.0
    contents: dict[str, str] = field(default_factory=dict)  # key -> sha256 of every object fetched

    def __len__(self) -> int:
        return len(self.decoded) + len(self.raw)

    @classmethod
    def concat(cls, parts: Sequence[Inputs]) -> Inputs:
        return cls(Pages.concat([p.decoded for p in parts]), Pages.concat([p.raw for p in parts]),
                   [f for p in parts for f in p.failures], Pages.concat([p.copies for p in parts]),
                   sum(p.fetch_s for p in parts), sum(p.decode_s for p in parts),
                   {k: v for p in parts for k, v in p.contents.items()})

    def split(self, n: int) -> tuple[Inputs, Inputs]:
        """The first `n` inputs (decoded pages first) with the failures, and the rest
        with the copies (a copy goes no earlier than the input whose bytes it shares)."""
        decoded, decoded_rest = self.decoded.split(n)
        raw, raw_rest = self.raw.split(n - len(decoded))
        if not len(decoded_rest) and not len(raw_rest):
            return Inputs(decoded, raw, self.failures, self.copies, self.fetch_s, self.decode_s, self.contents), Inputs()
        return (Inputs(decoded, raw, self.failures, Pages(), self.fetch_s, self.decode_s, self.contents),
                Inputs(decoded_rest, raw_rest, copies=self.copies))

    def pieces(self, size: int) -> list[Inputs]:
        """These inputs in pieces of at most `size` (the failures go with the first, the copies with the last)."""
        out, rest = [], self
        while len(rest) > size:
            head, rest = rest.split(size)
            out.append(head)
        return [*out, rest]

    def objects_done(self) -> int:
        """Objects these inputs finish: each one's last page, each failure, each copy."""
        return int(self.decoded.last.sum() + self.raw.last.sum()) + len(self.failures) + len(self.copies)


def batches(chunks: Iterable[Inputs], size: int | None = None, *, size_of=None) -> Iterator[Inputs]:
    """Chunks of inputs regrouped into model batches of `size` inputs (the last one
    shorter); `size_of()`, when given, is asked before each batch (the size may
    shrink while the shard runs). Failures travel with the next batch out."""
    held: list[Inputs] = []
    count = 0
    for chunk in chunks:
        held.append(chunk)
        count += len(chunk)
        want = size_of() if size_of else size
        while count >= want:
            batch, rest = Inputs.concat(held).split(want)
            yield batch
            held, count = [rest], len(rest)
            want = size_of() if size_of else size
    if held and (count or any(h.failures or len(h.copies) for h in held)):
        yield Inputs.concat(held)
