"""Property test of ReviewSession: no sequence of decisions, undos and paints loses labels.

For random small label maps and random sequences of accept, reject, undo, paint and
next, after every step the labels equal the model of :mod:`napari_pvs.review`
(the original, minus the clusters currently rejected, plus the painted voxels, last
paint wins), and the summary counters agree with the labels and the decisions.  The
oracle below is written from that model alone: it never looks at how the session
stores its state.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_pvs.review import ReviewSession

OPS = ("accept", "reject", "undo", "paint", "next")


@st.composite
def label_maps(draw):
    """A small 3D label map (up to 12^3) with a handful of boxes of value 1 or 2."""
    shape = tuple(draw(st.integers(3, 12)) for _ in range(3))
    lab = np.zeros(shape, np.uint8)
    for _ in range(draw(st.integers(1, 6))):
        lo = [draw(st.integers(0, n - 1)) for n in shape]
        hi = [draw(st.integers(a + 1, min(n, a + 4))) for a, n in zip(lo, shape, strict=True)]
        lab[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = draw(st.sampled_from([1, 2]))
    return lab


class Oracle:
    """The model: decisions with an undo stack, and the painted overlay."""

    def __init__(self, original: np.ndarray, clusters: np.ndarray):
        self.original = original.reshape(-1).copy()
        self.clusters = clusters.reshape(-1)
        self.decisions: dict[int, str] = {}
        self.stack: list[tuple[int, str | None]] = []
        self.painted: dict[int, int] = {}  # flat index -> last painted value
        self.events = 0

    def decide(self, cid: int, kind: str) -> bool:
        previous = self.decisions.get(cid)
        if previous == kind:
            return False  # a repeated decision is a no-op
        self.stack.append((cid, previous))
        self.decisions[cid] = kind
        self.events += 1
        return True

    def undo(self) -> int | None:
        if not self.stack:
            return None
        cid, previous = self.stack.pop()
        if previous is None:
            del self.decisions[cid]
        else:
            self.decisions[cid] = previous
        self.events += 1
        return cid

    def rejected_mask(self) -> np.ndarray:
        rejected = [c for c, k in self.decisions.items() if k == "rejected"]
        return np.isin(self.clusters, rejected) & (self.clusters > 0)

    def painted_mask(self) -> np.ndarray:
        mask = np.zeros(self.original.size, bool)
        mask[list(self.painted)] = True
        return mask

    def unpainted(self) -> np.ndarray:
        """What the decisions alone give: the original minus the rejected clusters."""
        return np.where(self.rejected_mask(), 0, self.original)

    def labels(self) -> np.ndarray:
        out = self.unpainted()
        if self.painted:
            out[list(self.painted)] = list(self.painted.values())
        return out


def check(s: ReviewSession, oracle: Oracle, lab: np.ndarray, step) -> None:
    flat = lab.reshape(-1)
    want = oracle.labels()
    bad = np.flatnonzero(flat != want)
    assert not len(bad), f"after {step}: {len(bad)} voxels differ from the model, e.g. {bad[:5]}"
    assert s.decisions == oracle.decisions, step
    sm = s.summary()
    kinds = list(oracle.decisions.values())
    assert sm["clusters_accepted"] == kinds.count("accepted"), step
    assert sm["clusters_rejected"] == kinds.count("rejected"), step
    assert sm["clusters_reviewed"] == s.reviewed == len(kinds), step
    rejected, painted = oracle.rejected_mask(), oracle.painted_mask()
    # voxels_rejected: the voxels that are 0 in the labels because their cluster is rejected
    assert sm["voxels_rejected"] == int(np.count_nonzero(rejected & ~painted)), step
    assert sm["voxels_rejected"] == int(np.count_nonzero((flat == 0) & rejected & ~painted)), step
    # voxels_painted_manually: the painted voxels that differ from the decisions alone
    differ = painted & (flat != oracle.unpainted())
    assert sm["voxels_painted_manually"] == int(np.count_nonzero(differ)), step
    assert len(s.events) == oracle.events, step
    assert s.dirty == (oracle.events > 0), step


@pytest.mark.slow  # ~7 s on a busy 2-core machine: hypothesis draws dominate
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(lab=label_maps(), data=st.data())
def test_review_sequences_never_lose_labels(lab, data):
    s = ReviewSession(lab)
    assert s.n >= 1
    oracle = Oracle(lab, s.clusters)
    check(s, oracle, lab, "start")
    order = s.order("voxels")
    current = None
    for _ in range(data.draw(st.integers(1, 30), label="steps")):
        op = data.draw(st.sampled_from(OPS), label="op")
        if op in ("accept", "reject"):
            cid = data.draw(st.integers(1, s.n), label="cluster")
            event = getattr(s, op)(cid)
            changed = oracle.decide(cid, f"{op}ed")
            assert (event is not None) == changed
            step = (op, cid)
        elif op == "undo":
            step = ("undo", s.undo())
            assert step[1] == oracle.undo()
        elif op == "paint":
            # as napari does: write into the labels, then report the voxels that changed
            value = data.draw(st.sampled_from([0, 1]), label="value")
            voxels = st.lists(st.integers(0, lab.size - 1), min_size=1, max_size=12)
            idx = np.unique(data.draw(voxels, label="voxels"))
            flat = lab.reshape(-1)
            idx = idx[flat[idx] != value]
            flat[idx] = value
            if data.draw(st.booleans(), label="multi-index"):
                event = s.record_paint(np.unravel_index(idx, lab.shape), value)
            else:
                event = s.record_paint(idx, value)
            assert (event is not None) == bool(len(idx))
            oracle.painted.update(dict.fromkeys(idx.tolist(), value))
            oracle.events += bool(len(idx))
            step = ("paint", idx.tolist(), value)
        else:
            current = s.next_unreviewed(order, after=current)
            unreviewed = [c for c in order if c not in oracle.decisions]
            assert current in order and (not unreviewed or current in unreviewed)
            step = ("next", current)
        check(s, oracle, lab, step)
    while s.undo() is not None:  # undoing every decision leaves only the paint
        oracle.undo()
    check(s, oracle, lab, "undo all")
    assert not oracle.decisions
