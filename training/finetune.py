"""Incremental fine-tuning on the store's corrections, with checkpoints and resume.

:func:`finetune` is a generator: it yields :class:`FinetuneEvent` (iterations with
their loss, validations with voxel / cluster Dice, checkpoints) and returns the id of
the model it registered in the store.  The GUI runs it in a worker; the CLI drains it.

* Start from a registered model (id), a checkpoint file, or from scratch.
* It learns from every corrected subject and from the cluster decisions of reviewed
  ones (review-only label versions, :func:`~napari_pvs.training.data.training_versions`).
* Each batch mixes subjects whose corrections the parent model has not seen with
  replayed older ones (``replay_fraction``), so the model does not forget.
* Loss: MONAI ``DiceCELoss`` under ``DeepSupervisionLoss`` (all decoder heads);
  AdamW; polynomial learning-rate decay; fp16 autocast on CUDA only.  When some
  training subjects are review-only, every batch carries loss weights and the loss
  ignores their unreviewed voxels (:mod:`napari_pvs.training.losses`); a store of
  full corrections only trains exactly as before.
* Every epoch: validation on held-out corrected subjects (the best weights are kept)
  and a checkpoint (``work_dir/state.pt``, written atomically, loaded with
  ``weights_only=True``).  ``resume=True`` continues from it after a crash; after a
  run that finished, it returns the model that run registered instead of a duplicate.
  Only subjects known in full are held out: review-only ones cannot be scored, and
  always train.  Without a full subject to hold out there is no validation, and the
  last weights are registered (the start event says so).
* ``cancel`` (a ``threading.Event``) is checked every iteration.
* A non-finite loss or non-finite weights stop the run with :class:`TrainingDiverged`;
  nothing is registered.

Training never holds the store's write lock: it reads immutable label versions from
a store that may be opened read-only, writes only into its own work folder (locked
against a second run in the same folder), and takes the store's write lock, waiting
up to ``wait`` seconds, only to register the model and log the event.  Annotators can
commit corrections while a run is going on.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np

from napari_pvs._backends import make_runner, pick_device
from napari_pvs._errors import PVSInputError
from napari_pvs._fs import atomic_path
from napari_pvs._store_checks import check_wait
from napari_pvs.inference import predict_prepared, run
from napari_pvs.metrics import cluster_scores, voxel_dice
from napari_pvs.model import (
    STARTER_MODELS,
    arch_config,
    build_network,
    default_meta,
    load_checkpoint,
    starter_path,
)
from napari_pvs.store import CorrectionsStore

from ._distributed import barrier, distributed, shard_subjects
from .config import FinetuneConfig
from .data import PatchSampler, SubjectCache, label_kinds, training_versions
from .trainer import Trainer, TrainEvent, TrainingCancelled, TrainingDiverged

__all__ = ["FinetuneConfig", "FinetuneEvent", "TrainingCancelled", "TrainingDiverged", "finetune"]

FinetuneEvent = TrainEvent  # the name the job, the worker and the CLI use


def _initial(store, init, cfg):
    """(net with deep-supervision heads, meta, parent id)."""
    if init is None:
        arch = arch_config(cfg.variant, cfg.kernel_size)
        meta = default_meta(arch, target_spacing=list(cfg.target_spacing or (0.8, 0.8, 0.8)),
                            patch_size=[max(p, 32) for p in cfg.patch])
        return build_network(arch, deep_supervision=True), meta, None
    if str(init) in STARTER_MODELS:  # "starter": the model shipped in the package
        init = starter_path(str(init))
    path = Path(init)
    net, meta = load_checkpoint(path) if path.suffix == ".safetensors" and path.is_file() \
        else store.models.load(str(init))
    meta.pop("card", None)  # the card describes the parent's data and scores, not the child's
    arch = {k: v for k, v in meta["arch"].items() if k != "deep_supervision_heads"}
    ds = build_network(arch, deep_supervision=True)
    missing, unexpected = ds.load_state_dict(net.state_dict(), strict=False)
    if unexpected or any(not k.startswith("out_blocks.") for k in missing):
        raise PVSInputError(f"cannot fine-tune {init}: weights do not fit its architecture")
    return ds, meta, meta["id"]


def _origin(parent_provenance: dict) -> dict | None:
    """Where the parent's weights first came from: its own ``origin``, or for a model
    imported from a MedNet-PVS release the release's folder, trainer, plans and fold."""
    if parent_provenance.get("origin"):
        return parent_provenance["origin"]
    keys = ("source_folder", "trainer", "plans", "fold")
    found = {k: parent_provenance[k] for k in keys if parent_provenance.get(k) is not None}
    return found or None


def validation_predictions(net, meta, data, *, device: str, backend: str = "auto",
                           tta: int = 1):
    """``(subject, prediction)`` of ``net`` for each preprocessed subject (``SubjectData``).

    The prediction stages of :func:`napari_pvs.inference.predict_volume` after its
    preprocessing (window plan, runner, TTA merger, back to the source grid,
    post-processing) run on each cached subject, so validation sees what ``napari-pvs
    predict`` would.  On the CPU the runner is the fast exported runtime when one is
    installed.  ``net`` is back in training mode once the generator is exhausted.
    """
    pre = meta.get("preprocessing") or {}
    patch = tuple(int(p) for p in (pre.get("patch_size") or (64, 64, 64)))
    net.eval()
    try:
        runner = make_runner(net, window=patch, device=device, backend=backend)
        for d in data:
            yield d, run(predict_prepared(d.prep, runner, meta, tta=tta,
                                          overlap=float(pre.get("overlap", 0.5)),
                                          roi=d.source_roi))
    finally:
        net.to(device).train()


def validation_scores(net, meta, data, *, device: str, backend: str = "auto") -> tuple[float, float]:
    """Mean voxel and cluster Dice of ``net`` on preprocessed subjects (``SubjectData``),
    scored on the source grid (:func:`validation_predictions`)."""
    vd, cd = [], []
    for d, pred in validation_predictions(net, meta, data, device=device, backend=backend):
        vd.append(voxel_dice(pred.labels, d.source_labels, d.source_roi))
        cd.append(cluster_scores(pred.labels, d.source_labels, mask=d.source_roi).dice)
    return float(np.mean(vd)), float(np.mean(cd))


def _save_state(path: Path, state: dict) -> None:
    """Write the run's checkpoint atomically (temporary file, fsync, rename)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, cfg: FinetuneConfig) -> dict:
    """The run checkpoint for ``resume``: tensors and plain data only (``weights_only``)."""
    import torch

    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
        keys = ("model", "optimizer", "iteration", "best", "best_state", "config")
        if not isinstance(st, dict) or any(k not in st for k in keys):
            raise ValueError("keys missing")
        st["iteration"], st["best"] = int(st["iteration"]), float(st["best"])
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise PVSInputError(f"{path} is not a readable training checkpoint ({type(exc).__name__}); "
                            "it is corrupt or truncated: train again without --resume") from None
    if st["config"] != json.loads(json.dumps(asdict(cfg))):
        raise PVSInputError(f"{path} was written with another configuration; start anew "
                            "without --resume or use the same settings")
    return st


def _lock_work_dir(work: Path) -> int:
    """An exclusive lock on the run's work folder: two runs never share a checkpoint."""
    fd = os.open(work / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PVSInputError(f"another training run is using {work}; wait for it to finish, or "
                            "train in another work folder") from None
    return fd


def _registered_by(store, run: str) -> str | None:
    """Id of the model that the run ``run`` already registered, if any."""
    for meta in store.models.list():
        if (meta.get("provenance") or {}).get("run") == run:
            return meta["id"]
    return None


def _register(store, net, meta: dict, parent, wait: float) -> str:
    """Register under the store's write lock (taken here unless ``store`` holds it)."""
    if store.writable:
        model_id = store.models.register(net, meta)
        store.log_event(None, "model", {"model_id": model_id, "parent": parent})
        return model_id
    with CorrectionsStore.open(store.path, writable=True, wait=wait) as locked:
        return _register(locked, net, meta, parent, wait)


def _split(cfg, versions, train_subjects, val_subjects, kinds=None):
    """``(train, val, versions)``: the fixed split of a fold, else a seeded hold-out of
    the subjects known in full (``kinds``: review-only subjects always train)."""
    kinds = kinds or {}
    if train_subjects is not None:
        unknown = sorted(set(train_subjects) - set(versions))
        if unknown:
            raise PVSInputError(f"training subjects without corrected labels: {unknown}")
        partial = sorted(s for s in val_subjects or [] if kinds.get(s) == "review")
        if partial:
            raise PVSInputError(f"validation subjects {partial} have review-only labels (cluster "
                                "decisions), which cannot be scored; validate on subjects "
                                "with a full correction")
        train = sorted(train_subjects)
        val = sorted(s for s in (val_subjects or []) if s in versions)
        return train, val, {s: versions[s] for s in [*train, *val]}
    subjects = sorted(s for s in versions if kinds.get(s, "full") == "full")
    rng = np.random.default_rng(cfg.seed)
    n_val = int(round(cfg.val_fraction * len(subjects))) if len(subjects) > 1 else 0
    val = sorted(rng.choice(subjects, size=n_val, replace=False).tolist()) if n_val else []
    return [s for s in sorted(versions) if s not in val] or subjects, val, versions


class _Finetune(Trainer):
    """The trainer's hooks for the store: held-out validation, resumable checkpoints,
    registration of the best weights."""

    def __init__(self, store, cfg, net, meta, parent, work: Path, cancel, split, wait,
                 kinds=None):
        import torch

        self.store, self.cfg, self.meta, self.parent, self.wait = store, cfg, meta, parent, wait
        self.train_ids, self.val, self.versions = split
        self.review_only = sorted(s for s in self.train_ids if (kinds or {}).get(s) == "review")
        self.state_path, self.run_id = work / "state.pt", uuid.uuid4().hex
        dev = pick_device(cfg.device)
        self.rank, self.world = distributed(dev)
        self.pre = {**meta["preprocessing"],
                    "target_spacing": cfg.target_spacing or meta["preprocessing"].get("target_spacing")}
        seen = {} if parent is None else dict(meta["provenance"].get("data_versions") or {})
        self.new = [s for s in self.train_ids if seen.get(s) != self.versions[s]]
        self.weights = [(1 - cfg.replay_fraction) / max(len(self.new), 1) * (s in self.new)
                        + cfg.replay_fraction / len(self.train_ids) for s in self.train_ids]
        self.cache = SubjectCache(store, self.versions, self.pre, cfg.cache_budget_mb * 2**20,
                                  cfg.review_rim, cfg.review_gap)
        self.sampler = PatchSampler(self.cache, self.train_ids, cfg.patch, cfg.pos_fraction,
                                    augment=cfg.augment, seed=cfg.seed + self.rank,
                                    weights=self.weights)
        net = net.to(dev)
        model = torch.nn.parallel.DistributedDataParallel(net) if self.world > 1 else None
        super().__init__(net, self._batch, iterations=cfg.iterations, lr=cfg.lr,
                         iterations_per_epoch=cfg.iterations_per_epoch, device=dev, model=model,
                         cancel=cancel)

    def _batch(self, it: int):
        if self.world > 1 and it % self.cfg.iterations_per_epoch == 0:
            shard_subjects(self.sampler, self.train_ids, self.weights, self.rank, self.world,
                           self.cfg.seed, it // self.cfg.iterations_per_epoch)
        if self.review_only:  # loss weights: the unreviewed voxels of those subjects count 0
            x, y, _, mask = self.sampler.batch(self.cfg.batch_size, masks=True)
            return x, y, mask
        x, y, _ = self.sampler.batch(self.cfg.batch_size)
        return x, y

    def resume(self) -> str | None:
        """Continue from the work folder's checkpoint; the model id if the run already registered."""
        import torch

        st = _load_state(self.state_path, self.cfg)
        try:
            self.net.load_state_dict(st["model"])
            self.opt.load_state_dict(st["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise PVSInputError(f"{self.state_path} does not fit this model ({type(exc).__name__}); "
                                "train again without --resume") from None
        self.start, self.best, self.best_state = st["iteration"], st["best"], st["best_state"]
        self.run_id = str(st.get("run") or self.run_id)
        self.sampler.rng = np.random.default_rng([self.cfg.seed, self.start])
        torch.manual_seed(self.cfg.seed + self.start)
        return _registered_by(self.store, self.run_id) if self.start >= self.cfg.iterations else None

    def validate(self, iteration):
        if self.rank != 0 or not self.val:
            return None
        vd, cd = validation_scores(self.net, self.meta, [self.cache.get(s) for s in self.val],
                                   device=self.device)
        yield TrainEvent("validation", iteration, self.iterations, val_dice=vd, val_cluster_dice=cd)
        return cd

    def checkpoint(self, iteration, score):
        if self.rank != 0:
            return
        yield from super().checkpoint(iteration, score)
        _save_state(self.state_path, {
            "model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
            "iteration": iteration, "best": self.best, "best_state": self.best_state,
            "config": json.loads(json.dumps(asdict(self.cfg))), "run": self.run_id})
        yield TrainEvent("checkpoint", iteration, self.iterations, message=str(self.state_path))

    def _fit_triage(self, net, meta):
        """Refit the triage classifier and temperature on the validation subjects; the
        parent's no longer describe the new weights.  Without validation subjects, or
        when their clusters are all true (or all false) positives, the model has none and
        the review falls back to the heuristic priority; the provenance says why."""
        from .triage import fit, store_samples

        meta.pop("triage", None)
        meta.pop("calibration", None)
        n = self.iterations
        if not self.val:
            meta["provenance"]["triage"] = "not fitted: no validation subjects"
            return
        yield TrainEvent("triage", n, n, message=f"fitting the false-positive triage on "
                                                 f"{len(self.val)} validation subjects")
        samples = store_samples(net, meta, [self.cache.get(s) for s in self.val], self.store,
                                device=self.device)
        try:
            meta["calibration"], meta["triage"] = fit(samples, log=lambda m: None)
        except ValueError as exc:
            meta.pop("calibration", None)
            meta["provenance"]["triage"] = f"not fitted: {exc}"

    def register(self):
        n = self.iterations
        yield TrainEvent("trained", n, n, message=f"rank {self.rank} of {self.world}",
                         extra={"weights_sha256": _weights_sha(self.net)})
        if self.rank != 0:  # only the first process validates, checkpoints and registers
            barrier(self.world)
            yield TrainEvent("done", n, n, message=f"rank {self.rank} done")
            return None
        net = yield from super().register()
        meta = json.loads(json.dumps(self.meta))
        meta["id"] = meta["created"] = None
        meta["preprocessing"]["target_spacing"] = list(self.pre["target_spacing"] or [1.0] * 3)
        meta["provenance"] = {"parent": self.parent, "data_versions": self.versions,
                              "iterations": n, "metrics": {"val_cluster_dice":
                                                           self.best if self.val else None},
                              "validation_subjects": self.val, "note": "fine-tuned on corrections",
                              "run": self.run_id}
        if self.review_only:
            meta["provenance"]["review_only_subjects"] = self.review_only
        origin = _origin(self.meta.get("provenance") or {})
        if self.parent is not None and origin:
            meta["provenance"]["origin"] = origin
        yield from self._fit_triage(net, meta)
        model_id = _register(self.store, net, meta, self.parent, self.wait)
        barrier(self.world)
        yield TrainEvent("done", n, n, message=model_id)
        return model_id


def finetune(store, *, init=None, config: FinetuneConfig | None = None,
             work_dir: str | os.PathLike[str] | None = None, resume: bool = False,
             cancel: threading.Event | None = None, train_subjects=None, val_subjects=None,
             wait: float = 30.0):
    """Fine-tune on every corrected or reviewed subject of ``store``; returns the new model id.

    ``store`` may be opened read-only: the write lock is taken (waiting up to ``wait``
    seconds) only to register the model.  ``train_subjects`` / ``val_subjects`` fix the
    split (cross-validation folds; validation subjects need full labels); otherwise
    ``val_fraction`` of the subjects known in full are held out, seeded.  Subjects with
    review-only labels (cluster decisions) always train, on their reviewed voxels only;
    with no full subject to hold out the run does not validate and registers its last
    weights.
    """
    cfg = (config or FinetuneConfig()).validate()
    wait = check_wait(wait)  # now, not when registering after the whole run
    work = Path(work_dir) if work_dir else store.path / "training" / "current"
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PVSInputError(f"cannot create the training folder {work} ({exc.strerror}); "
                            "pass a writable work folder") from None
    # under torchrun the processes share the folder; process 0 holds its lock
    fd = _lock_work_dir(work) if os.environ.get("RANK", "0") == "0" else None
    try:
        return (yield from _finetune(store, init, cfg, work, resume, cancel, train_subjects,
                                     val_subjects, wait))
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _finetune(store, init, cfg, work, resume, cancel, train_subjects, val_subjects, wait):
    import torch

    torch.manual_seed(cfg.seed)  # new networks start from seeded weights
    net, meta, parent = _initial(store, init, cfg)
    versions = training_versions(store)
    if not versions:
        raise PVSInputError(f"{store.path} has no corrected or reviewed subjects; save "
                            "corrections (or cluster decisions) first")
    kinds = label_kinds(store, versions)
    split = _split(cfg, versions, train_subjects, val_subjects, kinds)
    trainer = _Finetune(store, cfg, net, meta, parent, work, cancel, split, wait, kinds)
    if resume and trainer.state_path.is_file():
        done = trainer.resume()
        if done is not None:  # the run finished and registered: never a duplicate
            yield FinetuneEvent("done", cfg.iterations, cfg.iterations, message=done,
                                extra={"already_registered": True})
            return done
    else:
        torch.manual_seed(cfg.seed)
    train, val = split[0], split[1]
    partial = len(trainer.review_only)
    return (yield from trainer.run(
        f"{len(train)} training ({len(trainer.new)} new"
        + (f", {partial} review-only: reviewed voxels only" if partial else "")
        + f"), {len(val)} validation subjects"
        + ("; no validation: no subject with a full correction to hold out, the last weights "
           "are registered" if partial and not val else "")
        + ("" if trainer.device.startswith("cuda") else "; CPU run: small patches and model")))


def _weights_sha(net) -> str:
    import hashlib

    h = hashlib.sha256()
    for key, value in sorted(net.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


