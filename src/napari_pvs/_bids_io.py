"""Finding a BIDS dataset's images and naming their PVS derivatives.

* :func:`find_images` lists the anatomical images of one contrast (``T2w``, ``T1w``)
  with pybids (``reader="pybids"``, the default) or with :func:`_glob_images`
  (``reader="glob"``), the project's own reader: a walk of ``sub-*/[ses-*/]anat`` that
  parses the entities of each file name.  Both return the same :class:`BidsImage`
  list, sorted by path; a test checks that they agree on a dataset with sessions,
  runs and acquisitions, and ``benchmarks/bench_cohort.py`` times both.
* :func:`derivative_paths` names the outputs of one image in a BIDS-derivatives
  folder: the source entities (``sub``, ``ses``, ``acq``, ``ce``, ``rec``, ``run``),
  ``space-<contrast>`` (the native space of the source image, ``T2w`` or ``T1w``: the
  outputs of a subject's T1w and T2w images never share a name), then ``label-PVS`` and
  the suffix (``_mask``, ``_probseg``, ``.tsv`` tables), each with a JSON sidecar, so
  that ``BIDSLayout(..., derivatives=True)`` indexes them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import PVSInputError

__all__ = ["BidsImage", "derivative_paths", "find_images"]

#: the entities a derivative keeps from its source file, in BIDS order
SOURCE_ENTITIES = ("subject", "session", "acquisition", "ceagent", "reconstruction", "run")
_KEYS = {"subject": "sub", "session": "ses", "acquisition": "acq", "ceagent": "ce",
         "reconstruction": "rec", "run": "run"}
_NAME = re.compile(r"^(?P<entities>(?:[a-zA-Z]+-[a-zA-Z0-9]+_)+)(?P<suffix>[a-zA-Z0-9]+)"
                   r"(?P<ext>\.nii(?:\.gz)?)$")


@dataclass(frozen=True)
class BidsImage:
    """One anatomical image of the dataset: its path, its entities and its suffix."""

    path: Path
    entities: dict = field(hash=False, compare=False)
    suffix: str = "T2w"

    @property
    def stem(self) -> str:
        """``sub-01_ses-1_run-1`` (the source entities, BIDS order)."""
        return "_".join(f"{_KEYS[k]}-{self.entities[k]}" for k in SOURCE_ENTITIES
                        if self.entities.get(k) not in (None, ""))

    @property
    def subject(self) -> str:
        return str(self.entities["subject"])

    @property
    def session(self) -> str | None:
        s = self.entities.get("session")
        return None if s in (None, "") else str(s)


def _labels(values, what: str) -> list[str] | None:
    """``--participant-label 01 sub-02`` -> ``["01", "02"]`` (BIDS Apps accept both)."""
    if not values:
        return None
    out = []
    for v in values:
        v = str(v)
        v = v[4:] if v.startswith(("sub-", "ses-")) else v
        if not re.fullmatch(r"[a-zA-Z0-9]+", v):
            raise PVSInputError(f"--{what} {v!r} is not a BIDS label (letters and digits "
                                "only, with or without the sub-/ses- prefix)")
        out.append(v)
    return out


def find_images(bids_dir: str | os.PathLike[str], suffix: str = "T2w", *,
                participants=None, sessions=None, reader: str = "pybids") -> list[BidsImage]:
    """The ``anat`` images with ``suffix`` (``.nii`` / ``.nii.gz``), optionally of some
    participants and sessions; sorted by path.

    Raises
    ------
    PVSInputError
        ``bids_dir`` is not a BIDS dataset (no folder, or no ``dataset_description.json``),
        a label is malformed, or a requested participant has no such image.
    """
    root = Path(bids_dir)
    if not root.is_dir():
        raise PVSInputError(f"{root}: no such folder; give the BIDS dataset's root")
    if not (root / "dataset_description.json").is_file():
        raise PVSInputError(f"{root}: no dataset_description.json, so not a BIDS dataset's "
                            "root; give the folder that holds it and the sub-* folders")
    subs, sess = _labels(participants, "participant-label"), _labels(sessions, "session-label")
    if reader == "pybids":
        images = _pybids_images(root, suffix, subs, sess)
    elif reader == "glob":
        images = _glob_images(root, suffix, subs, sess)
    else:
        raise ValueError(f"reader must be 'pybids' or 'glob', got {reader!r}")
    if subs:
        missing = sorted(set(subs) - {im.subject for im in images})
        if missing:
            raise PVSInputError(f"{root}: no {suffix} image of participant(s) "
                                f"{', '.join('sub-' + m for m in missing)}; check "
                                "--participant-label (and --session-label)")
    return images


def _pybids_images(root: Path, suffix: str, subs, sess) -> list[BidsImage]:
    import warnings

    from bids import BIDSLayout, BIDSLayoutIndexer

    with warnings.catch_warnings():  # pybids' deprecation chatter is not the user's
        warnings.simplefilter("ignore")
        try:  # the sidecars' metadata is not needed: not indexing it is faster, and a
            # broken sidecar elsewhere in the dataset does not stop the run
            layout = BIDSLayout(str(root), validate=False, derivatives=False,
                                indexer=BIDSLayoutIndexer(validate=False, index_metadata=False))
        except Exception as exc:  # pybids raises many types; one line for the user
            raise PVSInputError(f"{root}: pybids cannot index the dataset ({type(exc).__name__}"
                                f": {' '.join(str(exc).split())}); fix it, or read it with "
                                "--reader glob") from None
        query = {"suffix": suffix, "datatype": "anat", "extension": [".nii", ".nii.gz"]}
        if subs:
            query["subject"] = subs
        if sess:
            query["session"] = sess
        files = layout.get(return_type="object", **query)
    out = []
    for f in files:
        ents = f.get_entities()
        # with validation off pybids also lists stray names (notes_T2w.nii.gz): keep the
        # files that name their subject, as BIDS requires
        if not Path(f.path).name.startswith(f"sub-{ents.get('subject')}_"):
            continue
        out.append(BidsImage(Path(f.path), {k: str(ents[k]) for k in SOURCE_ENTITIES
                                            if ents.get(k) not in (None, "")}, suffix))
    return sorted(out, key=lambda im: str(im.path))


def _glob_images(root: Path, suffix: str, subs, sess) -> list[BidsImage]:
    out = []
    for sub_dir in sorted(root.glob("sub-*")):
        if not sub_dir.is_dir() or (subs and sub_dir.name[4:] not in subs):
            continue
        anat_dirs = [sub_dir / "anat"] + sorted(d / "anat" for d in sub_dir.glob("ses-*")
                                                if d.is_dir())
        for anat in anat_dirs:
            if not anat.is_dir():
                continue
            for f in sorted(anat.iterdir()):
                m = _NAME.match(f.name)
                if m is None or m["suffix"] != suffix or not f.is_file():
                    continue
                pairs = dict(p.split("-", 1) for p in m["entities"].rstrip("_").split("_"))
                ents = {k: pairs[_KEYS[k]] for k in SOURCE_ENTITIES if _KEYS[k] in pairs}
                if ents.get("subject") != sub_dir.name[4:]:
                    continue  # a file of another subject in this folder: not BIDS
                if anat.parent != sub_dir and ents.get("session") != anat.parent.name[4:]:
                    continue
                if sess and ents.get("session") not in sess:
                    continue
                out.append(BidsImage(f.resolve(), ents, suffix))
    return sorted(out, key=lambda im: str(im.path))


def derivative_paths(out_dir: str | os.PathLike[str], image: BidsImage) -> dict[str, Path]:
    """Where the outputs of ``image`` go in the derivatives folder ``out_dir``.

    ``mask`` (uint8 PVS labels), ``probseg`` (P(PVS)), ``uncertainty`` (its entropy, a
    ``desc-uncertainty`` probseg), ``clusters`` (one row per PVS cluster), ``stats``
    (count, volume and median cluster size per region), ``montage`` (the QC figure), and
    ``record`` (the provenance sidecar of the mask, written last: its input hash and
    model id say that the set is complete and whose it is).
    """
    folder = Path(out_dir) / f"sub-{image.subject}"
    if image.session:
        folder = folder / f"ses-{image.session}"
    anat = folder / "anat"
    base = f"{image.stem}_space-{image.suffix}_label-PVS"
    return {
        "mask": anat / f"{base}_mask.nii.gz",
        "record": anat / f"{base}_mask.json",
        "probseg": anat / f"{base}_probseg.nii.gz",
        "uncertainty": anat / f"{base}_desc-uncertainty_probseg.nii.gz",
        "clusters": anat / f"{base}_clusters.tsv",
        "stats": anat / f"{base}_stats.tsv",
        "montage": Path(out_dir) / f"sub-{image.subject}" / "figures"
        / f"{base}_desc-montage.png",
    }
