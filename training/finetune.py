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
  ``weights_only=True``).  ``resume=True`` continues from it after a crash.
* ``cancel`` (a ``threading.Event``) is checked every iteration.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .data import PatchSampler, SubjectCache, corrected_versions

__all__ = ["FinetuneConfig", "FinetuneEvent", "TrainingCancelled", "finetune"]


class TrainingCancelled(RuntimeError):
    """The cancel event was set; the last epoch checkpoint allows ``resume``."""


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
        from napari_pvs import PVSInputError

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
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def finetune(store, *, init=None, config: FinetuneConfig | None = None,
             work_dir: str | os.PathLike[str] | None = None, resume: bool = False,
             cancel: threading.Event | None = None, train_subjects=None, val_subjects=None):
    """Fine-tune on every corrected subject of ``store``; returns the new model id.

    ``train_subjects`` / ``val_subjects`` fix the split (cross-validation folds);
    otherwise ``val_fraction`` of the corrected subjects are held out, seeded.
    """
    import torch
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    from napari_pvs import PVSInputError

    cfg = config or FinetuneConfig()
    work = Path(work_dir) if work_dir else store.path / "training" / "current"
    work.mkdir(parents=True, exist_ok=True)
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
    start, best, best_state = 0, -1.0, None
    if resume and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if st["config"] != json.loads(json.dumps(asdict(cfg))):
            raise PVSInputError(f"{state_path} was written with another configuration; start anew "
                                "without --resume or use the same settings")
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        start, best, best_state = int(st["iteration"]), float(st["best"]), st["best_state"]
        sampler.rng = np.random.default_rng([cfg.seed, start])
        torch.manual_seed(cfg.seed + start)
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
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        yield FinetuneEvent("iteration", it + 1, cfg.iterations, loss=float(loss.detach()))
        if ((it + 1) % cfg.iterations_per_epoch == 0 or it + 1 == cfg.iterations) and rank == 0:
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
                                     "config": json.loads(json.dumps(asdict(cfg)))})
            yield FinetuneEvent("checkpoint", it + 1, cfg.iterations, message=str(state_path))
    yield FinetuneEvent("trained", cfg.iterations, cfg.iterations,
                        message=f"rank {rank} of {world}", extra={"weights_sha256": _weights_sha(net)})
    if rank != 0:  # only the first process validates, checkpoints and registers
        _barrier(world)
        yield FinetuneEvent("done", cfg.iterations, cfg.iterations, message=f"rank {rank} done")
        return None
    net.load_state_dict(best_state)
    net.eval()
    new_meta = json.loads(json.dumps(meta))
    new_meta["id"] = new_meta["created"] = None
    new_meta["preprocessing"]["target_spacing"] = list(target or [1.0, 1.0, 1.0])
    new_meta["provenance"] = {"parent": parent, "data_versions": versions, "iterations": cfg.iterations,
                              "metrics": {"val_cluster_dice": best if val else None},
                              "validation_subjects": val, "note": "fine-tuned on corrections"}
    model_id = store.models.register(net, new_meta)
    store.log_event(None, "model", {"model_id": model_id, "parent": parent})
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
