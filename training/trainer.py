"""The one training loop: a small trainer with hooks, after nnU-Net's ``run_training``.

:class:`Trainer` owns what every training run shares: AdamW, nnU-Net's polynomial
learning-rate decay, MONAI's Dice + cross-entropy loss (under ``DeepSupervisionLoss``
for networks with deep-supervision heads), fp16 autocast on CUDA, the cancel check and
the divergence check.  A batch that comes with loss weights (review-only labels: 1
where the label is known) is scored with :class:`~napari_pvs.training.losses.MaskedDiceCELoss`
on the same heads instead, which equals the usual loss for weights of ones; a batch
without them takes the usual loss, unchanged.  :meth:`Trainer.run` is a generator of
:class:`TrainEvent`:

    for each iteration:        train_step
    at the end of each epoch:  (weights finite?) validate, then checkpoint
    at the end:                register (returns the run's result)

Subclasses override the hooks (``validate``, ``checkpoint``, ``register``,
``on_event``); :mod:`napari_pvs.training.finetune` is one (store data, held-out
validation, resumable checkpoints, the model registry), and the fixed benchmark
model (``benchmarks/make_fixed_model.py``) uses the base class as it is.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np

from napari_pvs._errors import PVSInputError

__all__ = ["TrainEvent", "Trainer", "TrainingCancelled", "TrainingDiverged", "relay"]


class TrainingCancelled(RuntimeError):
    """The cancel event was set; the last epoch checkpoint allows ``resume``."""


class TrainingDiverged(PVSInputError):
    """The loss or the weights became non-finite; nothing was registered."""


@dataclass(frozen=True)
class TrainEvent:
    """Progress of a training run.

    ``kind`` is "start", "iteration", "validation", "checkpoint", "trained", "triage"
    (fine-tuning fits the false-positive triage) or "done".
    """

    kind: str
    iteration: int
    total: int
    loss: float | None = None
    val_dice: float | None = None
    val_cluster_dice: float | None = None
    message: str = ""
    extra: dict = field(default_factory=dict)


Batches = Callable[[int], tuple[np.ndarray, ...]]


class Trainer:
    """Train ``net`` on the batches that ``batches(iteration)`` returns.

    Parameters
    ----------
    net : torch.nn.Module
        The network; trained in place.
    batches : callable
        ``batches(iteration) -> (images (B, C, ...) float32, labels (B, 1, ...) int)``,
        or a third item, the loss weights (B, 1, ...) (1: label known, 0: ignore the
        voxel; None: all known), for batches of review-only labels.
    iterations : int
        Total iterations of the run.
    lr : float
        Initial learning rate; iteration ``i`` uses ``lr * (1 - i / iterations) ** 0.9``.
    iterations_per_epoch : int
        Validation and checkpoint every this many iterations (and at the end).
    device : str
        Torch device.
    model : torch.nn.Module, optional
        What the forward pass calls, when it is not ``net`` (e.g. a DDP wrapper).
    cancel : threading.Event, optional
        Checked before every iteration.
    """

    def __init__(self, net, batches: Batches, *, iterations: int, lr: float,
                 iterations_per_epoch: int | None = None, device: str = "cpu", model=None,
                 cancel: threading.Event | None = None):
        import torch
        from monai.losses import DeepSupervisionLoss, DiceCELoss

        self.net = net.to(device).train()
        self.model = model if model is not None else self.net
        self.batches, self.iterations, self.lr = batches, int(iterations), float(lr)
        self.per_epoch = int(iterations_per_epoch or iterations)
        self.device, self.cancel = str(device), cancel
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=1e-5)
        self.loss_fn = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True),
                                           weight_mode="exp")
        self.masked_loss_fn = None  # made for the first batch with loss weights
        self.amp = self.device.startswith("cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.start = 0
        self.best, self.best_state = -1.0, None

    # ------------------------------------------------------------------ hooks

    def lr_at(self, iteration: int) -> float:
        """nnU-Net's poly schedule."""
        return self.lr * (1 - iteration / self.iterations) ** 0.9

    def train_step(self, iteration: int) -> float:
        """One optimiser step on ``batches(iteration)``; returns the loss."""
        import torch

        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(iteration)
        x, y, *rest = self.batches(iteration)
        mask = rest[0] if rest else None
        # float labels: DeepSupervisionLoss resizes them to each head
        x, y = torch.from_numpy(x).to(self.device), torch.from_numpy(y).float().to(self.device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            out = self.model(x)
            heads = list(out) if isinstance(out, (tuple, list)) else [out]
            loss = self.loss_fn(heads, y) if mask is None else self.masked_loss(heads, y, mask)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(f"training diverged at iteration {iteration + 1}: the loss is "
                                   f"{value}; nothing was registered; train again with a lower "
                                   f"--lr than {self.lr:g}")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return value

    def masked_loss(self, heads: list, y, mask: np.ndarray):
        """The loss of a batch with loss weights: :class:`~napari_pvs.training.losses.
        MaskedDiceCELoss` on every head, weighted as :attr:`loss_fn` weights them."""
        import torch

        from .losses import MaskedDiceCELoss, deep_supervision

        if self.masked_loss_fn is None:
            self.masked_loss_fn = MaskedDiceCELoss()
        m = torch.as_tensor(np.asarray(mask, np.float32)).to(self.device)
        return deep_supervision(self.masked_loss_fn, heads, y, m,
                                self.loss_fn.get_weights(len(heads)), self.loss_fn.interp_mode)

    def validate(self, iteration: int) -> Generator[TrainEvent, None, float | None]:
        """Score the current weights (higher is better); None when there is nothing to score."""
        return None
        yield  # a generator

    def checkpoint(self, iteration: int, score: float | None) -> Generator[TrainEvent, None, None]:
        """Keep the best weights so far (the latest when there is no score)."""
        if score is None or score > self.best:
            self.best = -1.0 if score is None else float(score)
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        return
        yield  # a generator

    def register(self) -> Generator[TrainEvent, None, object]:
        """The run's result: by default the network with its best weights, in eval mode."""
        if self.best_state is not None:
            self.net.load_state_dict(self.best_state)
        self.check_finite(self.iterations)
        return self.net.eval()
        yield  # a generator

    def on_event(self, event: TrainEvent) -> TrainEvent:
        """Every event passes through here before it is yielded."""
        return event

    # ------------------------------------------------------------------ the loop

    def check_finite(self, iteration: int) -> None:
        """:class:`TrainingDiverged` when a weight is NaN or infinite."""
        import torch

        bad = [k for k, v in self.net.state_dict().items()
               if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise TrainingDiverged(f"training diverged at iteration {iteration}: {len(bad)} "
                                   f"weight tensors are not finite (e.g. {bad[0]}); nothing was "
                                   f"registered; train again with a lower --lr than {self.lr:g}")

    def epoch_end(self, iteration: int) -> bool:
        """True after the last iteration of an epoch (``iteration`` counts from 1)."""
        return iteration % self.per_epoch == 0 or iteration == self.iterations

    def run(self, message: str = "") -> Generator[TrainEvent, None, object]:
        """Train from ``self.start`` to ``iterations``; returns what :meth:`register` returns."""
        yield self.on_event(TrainEvent("start", self.start, self.iterations, message=message))
        for it in range(self.start, self.iterations):
            if self.cancel is not None and self.cancel.is_set():
                raise TrainingCancelled(f"training cancelled at iteration {it}")
            loss = self.train_step(it)
            yield self.on_event(TrainEvent("iteration", it + 1, self.iterations, loss=loss))
            if self.epoch_end(it + 1):
                self.check_finite(it + 1)  # before validating or keeping these weights
                score = yield from self._relay(self.validate(it + 1))
                yield from self._relay(self.checkpoint(it + 1, score))
        return (yield from self._relay(self.register()))

    def _relay(self, gen):
        """Yield a hook's events through :meth:`on_event`; return its value."""
        return (yield from relay(gen, self.on_event))


def relay(gen, wrap: Callable):
    """Yield ``wrap(event)`` for each event of the generator ``gen``; return its value."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        yield wrap(event)
