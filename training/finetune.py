"""Incremental fine-tuning on the store's corrections, with checkpoints and resume.

:func:`finetune` is a generator: it yields :class:`FinetuneEvent` (iterations with
their loss, validations with voxel / cluster Dice, checkpoints) and returns the id of
the model it registered in the store.  The GUI runs it in a worker; the CLI drains it.

* Start from a registered model (id), a checkpoint file, or from scratch.
* Each batch mixes subjects whose corrections the parent model has not seen with
  replayed older ones (``replay_fraction``), so the model does not forget.
* Loss: MONAI ``DiceCELoss`` under ``DeepSupervisionLoss`` (all decoder heads);
  AdamW; polynomial learning-rate decay; fp16 autocast on CUDA only.
* Every epoch: validation on held-out corrected subjects (the best weights are kept)
  and a checkpoint (``work_dir/state.pt``, written atomically, loaded with
  ``weights_only=True``).  ``resume=True`` continues from it after a crash; after a
  run that finished, it returns the model that run registered instead of a duplicate.
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
import math
import os
import threading
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from napari_pvs._errors import PVSInputError

from .data import PatchSampler, SubjectCache, corrected_versions

__all__ = ["FinetuneConfig", "FinetuneEvent", "TrainingCancelled", "TrainingDiverged", "finetune"]


class TrainingCancelled(RuntimeError):
    """The cancel event was set; the last epoch checkpoint allows ``resume``."""


class TrainingDiverged(PVSInputError):
    """The loss or the weights became non-finite; nothing was registered."""


@dataclass
class FinetuneConfig:
    iterations: int = 200
    iterations_per_epoch: int = 50
    patch: tuple[int, int, int] = (48, 48, 48)
    batch_size: int = 2
    lr: float = 3e-4
    pos_fraction: float = 0.5
    replay_fraction: float = 0.5
    val_fraction: float = 0.25
    variant: str = "XS"
    kernel_size: int = 3
    target_spacing: tuple[float, float, float] | None = None
    cache_budget_mb: int = 2048
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> FinetuneConfig:
        """Check every setting before any work starts; returns ``self``.

        Raises :class:`~napari_pvs.PVSInputError` with one line naming the bad value.
        The CLI, the training worker and :func:`finetune` all call it.
        """
        from napari_pvs.inference import pick_device
        from napari_pvs.model import arch_config, check_spacing

        flags = {"iterations": "--iterations", "iterations_per_epoch": "--epoch",
                 "seed": "--seed"}

        def whole(name, low, high=None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low or (high and v > high):
                rng = f">= {low}" if high is None else f"between {low} and {high}"
                flag = f" ({flags[name]})" if name in flags else ""
                raise PVSInputError(f"{name.replace('_', ' ')}{flag} must be a whole number {rng}, "
                                    f"got {v!r}")

        whole("iterations", 1)
        whole("iterations_per_epoch", 1)
        whole("batch_size", 1, 1024)
        whole("cache_budget_mb", 1)
        whole("seed", 0)
        patch = tuple(self.patch) if isinstance(self.patch, (tuple, list)) else (self.patch,)
        # MedNeXt halves the patch 4 times, and its GroupNorm needs more than one voxel
        # per channel at the 1/16 scale while training
        if len(patch) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or p < 32 or p % 16
                                  or p > 1024 for p in patch):
            raise PVSInputError(f"patch must be 3 edges that are multiples of 16 from 32 to 1024, "
                                f"got {self.patch!r}; use e.g. --patch 32 or 48")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) \
                or not math.isfinite(self.lr) or self.lr <= 0:
            raise PVSInputError(f"learning rate must be a finite number > 0, got {self.lr!r}; "
                                "use e.g. --lr 3e-4")
        for name in ("pos_fraction", "replay_fraction", "val_fraction"):
            v = getattr(self, name)
            top = 0.9 if name == "val_fraction" else 1
            if not isinstance(v, (int, float)) or not 0 <= v <= top:
                raise PVSInputError(f"{name} must lie in [0, {top}], got {v!r}")
        arch_config(self.variant, self.kernel_size)
        if self.target_spacing is not None:
            check_spacing(self.target_spacing, "target_spacing")
        pick_device(str(self.device))
        return self


@dataclass(frozen=True)
class FinetuneEvent:
    kind: str  # "start", "iteration", "validation", "checkpoint", "trained", "done"
    iteration: int
    total: int
    loss: float | None = None
    val_dice: float | None = None
    val_cluster_dice: float | None = None
    message: str = ""
    extra: dict = field(default_factory=dict)


def _initial(store, init, cfg):
    """(net with deep-supervision heads, meta, parent id)."""
    from napari_pvs.model import arch_config, build_network, default_meta, load_checkpoint

    if init is None:
        arch = arch_config(cfg.variant, cfg.kernel_size)
        meta = default_meta(arch, target_spacing=list(cfg.target_spacing or (0.8, 0.8, 0.8)),
                            patch_size=[max(p, 32) for p in cfg.patch])
        return build_network(arch, deep_supervision=True), meta, None
    path = Path(init)
    net, meta = load_checkpoint(path) if path.suffix == ".safetensors" and path.is_file() \
        else store.models.load(str(init))
    arch = {k: v for k, v in meta["arch"].items() if k != "deep_supervision_heads"}
    ds = build_network(arch, deep_supervision=True)
    missing, unexpected = ds.load_state_dict(net.state_dict(), strict=False)
    if unexpected or any(not k.startswith("out_blocks.") for k in missing):
        raise PVSInputError(f"cannot fine-tune {init}: weights do not fit its architecture")
    return ds, meta, meta["id"]


def _validate(net, meta, cache, subjects, device):
    from napari_pvs.inference import predict_volume, run
    from napari_pvs.metrics import cluster_scores, voxel_dice

    net.eval()
    vd, cd = [], []
    for sid in subjects:
        d = cache.get(sid)
        pred = run(predict_volume(d.image, (1.0, 1.0, 1.0), net,
                                  {**meta, "preprocessing": {**meta["preprocessing"],
                                                             "target_spacing": [1.0] * 3}},
                                  roi=d.roi, backend="torch", device=device))
        vd.append(voxel_dice(pred.labels, d.labels, d.roi))
        cd.append(cluster_scores(pred.labels, d.labels, mask=d.roi).dice)
    net.train()
    return float(np.mean(vd)), float(np.mean(cd))


def _save_state(path: Path, state: dict) -> None:
    """Write the run's checkpoint atomically (temporary file, fsync, rename)."""
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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


def _check_finite(net, iteration: int, lr: float) -> None:
    import torch

    bad = [k for k, v in net.state_dict().items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise TrainingDiverged(f"training diverged at iteration {iteration}: {len(bad)} weight "
                               f"tensors are not finite (e.g. {bad[0]}); nothing was registered; "
                               f"train again with a lower --lr than {lr:g}")


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
    from napari_pvs.store import CorrectionsStore

    with CorrectionsStore.open(store.path, writable=True, wait=wait) as locked:
        return _register(locked, net, meta, parent, wait)


def finetune(store, *, init=None, config: FinetuneConfig | None = None,
             work_dir: str | os.PathLike[str] | None = None, resume: bool = False,
             cancel: threading.Event | None = None, train_subjects=None, val_subjects=None,
             wait: float = 30.0):
    """Fine-tune on every corrected subject of ``store``; returns the new model id.

    ``store`` may be opened read-only: the write lock is taken (waiting up to ``wait``
    seconds) only to register the model.  ``train_subjects`` / ``val_subjects`` fix the
    split (cross-validation folds); otherwise ``val_fraction`` of the corrected subjects
    are held out, seeded.
    """
    from napari_pvs._store_checks import check_wait

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
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    state_path = work / "state.pt"
    torch.manual_seed(cfg.seed)  # new networks start from seeded weights
    net, meta, parent = _initial(store, init, cfg)
    target = cfg.target_spacing or meta["preprocessing"].get("target_spacing")
    versions = corrected_versions(store)
    if not versions:
        raise PVSInputError(f"{store.path} has no corrected subjects; save corrections first")
    subjects = sorted(versions)
    rng = np.random.default_rng(cfg.seed)
    if train_subjects is not None:
        unknown = sorted(set(train_subjects) - set(versions))
        if unknown:
            raise PVSInputError(f"training subjects without corrected labels: {unknown}")
        train = sorted(train_subjects)
        val = sorted(s for s in (val_subjects or []) if s in versions)
        versions = {s: versions[s] for s in [*train, *val]}
    else:
        n_val = int(round(cfg.val_fraction * len(subjects))) if len(subjects) > 1 else 0
        val = sorted(rng.choice(subjects, size=n_val, replace=False).tolist()) if n_val else []
        train = [s for s in subjects if s not in val] or subjects
    seen = {} if parent is None else dict(meta["provenance"].get("data_versions") or {})
    new = [s for s in train if seen.get(s) != versions[s]]
    weights = [(1 - cfg.replay_fraction) / max(len(new), 1) * (s in new)
               + cfg.replay_fraction / len(train) for s in train]
    rank, world = _distributed(cfg.device)
    cache = SubjectCache(store, versions, target, cfg.cache_budget_mb * 2**20)
    sampler = PatchSampler(cache, train, cfg.patch, cfg.pos_fraction, seed=cfg.seed + rank,
                           weights=weights)
    dev = cfg.device
    net = net.to(dev).train()
    model = net
    if world > 1:  # torchrun: gradients are averaged across processes every step
        model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-5)
    loss_fn = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True), weight_mode="exp")
    use_amp = dev.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start, best, best_state, run = 0, -1.0, None, uuid.uuid4().hex
    if resume and state_path.is_file():
        st = _load_state(state_path, cfg)
        try:
            net.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise PVSInputError(f"{state_path} does not fit this model ({type(exc).__name__}); "
                                "train again without --resume") from None
        start, best, best_state = st["iteration"], st["best"], st["best_state"]
        run = str(st.get("run") or run)
        sampler.rng = np.random.default_rng([cfg.seed, start])
        torch.manual_seed(cfg.seed + start)
        done = _registered_by(store, run) if start >= cfg.iterations else None
        if done is not None:  # the run finished and registered: never a duplicate
            yield FinetuneEvent("done", cfg.iterations, cfg.iterations, message=done,
                                extra={"already_registered": True})
            return done
    else:
        torch.manual_seed(cfg.seed)
    yield FinetuneEvent("start", start, cfg.iterations,
                        message=f"{len(train)} training ({len(new)} new), {len(val)} validation subjects"
                        + ("" if dev.startswith("cuda") else "; CPU run: small patches and model"))
    for it in range(start, cfg.iterations):
        if cancel is not None and cancel.is_set():
            raise TrainingCancelled(f"training cancelled at iteration {it}")
        lr = cfg.lr * (1 - it / cfg.iterations) ** 0.9
        for g in opt.param_groups:
            g["lr"] = lr
        if world > 1 and it % cfg.iterations_per_epoch == 0:
            _shard_subjects(sampler, train, weights, rank, world, cfg.seed, it // cfg.iterations_per_epoch)
        x, y, _ = sampler.batch(cfg.batch_size)
        x, y = torch.from_numpy(x).to(dev), torch.from_numpy(y).float().to(dev)  # float: DS resizes it
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            out = model(x)
            loss = loss_fn(list(out) if isinstance(out, (tuple, list)) else [out], y)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(f"training diverged at iteration {it + 1}: the loss is {value}; "
                                   f"nothing was registered; train again with a lower --lr than "
                                   f"{cfg.lr:g}")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        yield FinetuneEvent("iteration", it + 1, cfg.iterations, loss=value)
        if ((it + 1) % cfg.iterations_per_epoch == 0 or it + 1 == cfg.iterations) and rank == 0:
            _check_finite(net, it + 1, cfg.lr)  # before validating or keeping these weights
            score = None
            if val:
                vd, cdice = _validate(net, meta, cache, val, dev)
                score = cdice
                yield FinetuneEvent("validation", it + 1, cfg.iterations, val_dice=vd,
                                    val_cluster_dice=cdice)
            if score is None or score > best:
                best = -1.0 if score is None else score
                best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            _save_state(state_path, {"model": net.state_dict(), "optimizer": opt.state_dict(),
                                     "iteration": it + 1, "best": best, "best_state": best_state,
                                     "config": json.loads(json.dumps(asdict(cfg))), "run": run})
            yield FinetuneEvent("checkpoint", it + 1, cfg.iterations, message=str(state_path))
    yield FinetuneEvent("trained", cfg.iterations, cfg.iterations,
                        message=f"rank {rank} of {world}", extra={"weights_sha256": _weights_sha(net)})
    if rank != 0:  # only the first process validates, checkpoints and registers
        _barrier(world)
        yield FinetuneEvent("done", cfg.iterations, cfg.iterations, message=f"rank {rank} done")
        return None
    net.load_state_dict(best_state)
    _check_finite(net, cfg.iterations, cfg.lr)
    net.eval()
    new_meta = json.loads(json.dumps(meta))
    new_meta["id"] = new_meta["created"] = None
    new_meta["preprocessing"]["target_spacing"] = list(target or [1.0, 1.0, 1.0])
    new_meta["provenance"] = {"parent": parent, "data_versions": versions, "iterations": cfg.iterations,
                              "metrics": {"val_cluster_dice": best if val else None},
                              "validation_subjects": val, "note": "fine-tuned on corrections",
                              "run": run}
    model_id = _register(store, net, new_meta, parent, wait)
    _barrier(world)
    yield FinetuneEvent("done", cfg.iterations, cfg.iterations, message=model_id)
    return model_id


def _weights_sha(net) -> str:
    import hashlib

    h = hashlib.sha256()
    for key, value in sorted(net.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _distributed(device: str) -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _shard_subjects(sampler, train, weights, rank, world, seed, epoch) -> None:
    """This process's share of the training subjects for one epoch (DistributedSampler)."""
    from torch.utils.data.distributed import DistributedSampler

    shard = DistributedSampler(range(len(train)), num_replicas=world, rank=rank, shuffle=True,
                               seed=seed)
    shard.set_epoch(epoch)
    idx = list(shard)
    sampler.subjects = [train[i] for i in idx]
    w = np.asarray([weights[i] for i in idx], dtype=float)
    sampler.p = w / w.sum()
