"""A fine-tuning run that a GUI can follow and cancel: in a child process or a thread.

:class:`TrainingJob` wraps :func:`~napari_pvs.training.finetune.finetune` for the
retrain widget.  ``job.events()`` is a generator of
:class:`~napari_pvs.training.finetune.FinetuneEvent` that returns the new model id;
``job.cancel()`` may be called from any thread.

- ``mode="subprocess"`` (the default) runs ``python -m napari_pvs.training.worker``
  and reads its JSON-line events.  A crash of the child (a segfault, the OOM killer)
  becomes a :class:`TrainingFailed` with the child's last error output; napari keeps
  running.  ``benchmarks/bench_retrain_ui.py`` found no difference in GUI
  responsiveness between the two modes, so this isolation decides the default.
- ``mode="thread"`` runs ``finetune`` in the calling thread.

Either way the training reads the store without its write lock, so corrections can be
saved while it runs; it takes the lock (waiting up to ``wait`` seconds) only to
register the new model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Generator
from pathlib import Path

from napari_pvs.store import CorrectionsStore

from .finetune import FinetuneConfig, FinetuneEvent, TrainingCancelled, finetune
from .worker import config_args

__all__ = ["MODES", "TrainingFailed", "TrainingJob"]

MODES = ("subprocess", "thread")


class TrainingFailed(RuntimeError):
    """The training process reported an error or died."""


class TrainingJob:
    """One fine-tuning run on a store (see the module docstring).

    Parameters
    ----------
    store : path-like
        The corrections store folder.
    init : str, optional
        Model id or checkpoint to start from (default: a new network).
    config : FinetuneConfig, optional
    mode : {"subprocess", "thread"}
    wait : float
        Seconds to wait for the store's write lock when registering the model.
    """

    def __init__(self, store, *, init: str | None = None, config: FinetuneConfig | None = None,
                 mode: str = "subprocess", wait: float = 30.0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.store = Path(store)
        self.init = init
        self.config = config or FinetuneConfig()
        self.mode = mode
        self.wait = wait
        self._cancel = threading.Event()
        self._proc: subprocess.Popen | None = None

    def cancel(self) -> None:
        """Ask the run to stop; it ends with :class:`TrainingCancelled`."""
        self._cancel.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM: the worker sets its cancel flag and exits cleanly

    def command(self) -> list[str]:

        cmd = [sys.executable, "-m", "napari_pvs.training.worker", "--store", str(self.store),
               "--wait", str(self.wait), *config_args(self.config)]
        return cmd + (["--init", str(self.init)] if self.init else [])

    def events(self) -> Generator[FinetuneEvent, None, str]:
        """Run the job; yields its events and returns the registered model id."""
        if self.mode == "thread":
            return (yield from self._thread())
        return (yield from self._subprocess())

    def _thread(self):
        with CorrectionsStore.open(self.store) as store:  # the lock is taken only to register
            return (yield from finetune(store, init=self.init, config=self.config,
                                        cancel=self._cancel, wait=self.wait))

    def _subprocess(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with tempfile.TemporaryFile("w+") as err:
            self._proc = proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=err,
                                                 text=True, env=env)
            if self._cancel.is_set():
                proc.terminate()
            model_id = None
            last: dict = {}
            try:
                for line in proc.stdout:
                    try:
                        payload = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # stray output of a library
                    last = payload
                    kind = payload.get("kind")
                    if kind == "result":
                        model_id = payload["model_id"]
                    elif kind not in ("cancelled", "error"):
                        yield FinetuneEvent(**payload)
            finally:
                if proc.poll() is None and model_id is None:
                    proc.terminate()  # the consumer stopped early: do not leave an orphan
                rc = proc.wait()
                self._proc = None
            err.seek(0)
            tail = err.read()[-2000:].strip()
        if last.get("kind") == "cancelled" or (self._cancel.is_set() and model_id is None):
            raise TrainingCancelled(last.get("message") or "training cancelled")
        if last.get("kind") == "error":
            raise TrainingFailed(f"{last.get('type')}: {last.get('message')}")
        if rc != 0 or model_id is None:
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            raise TrainingFailed(f"the training process {how}"
                                 + (f"; its last output:\n{tail}" if tail else ""))
        return model_id
