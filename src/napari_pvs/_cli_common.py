"""What every ``napari-pvs`` subcommand shares: argument types, ``-o/--out``, ``--device``,
``--store``, and the progress report of long commands."""

from __future__ import annotations

import argparse
import math
import sys
import time

from .inference import pick_device

__all__ = ["ProgressReport", "add_device", "add_out", "add_store", "duration", "number",
           "resolve_device", "settle_out"]


def number(kind, lo: float, hi: float, *, hi_open: bool = False, what: str = "a number"):
    """An argparse ``type``: ``kind`` (int or float) within [lo, hi] (or [lo, hi)), finite."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        inside = lo <= value < hi if hi_open else lo <= value <= hi
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(
                f"{text} is out of range: use {what} from {lo:g} to {hi:g}"
                f"{' (exclusive)' if hi_open else ''}")
        return value

    return parse


def add_out(p: argparse.ArgumentParser, what: str, *, positional: str | None = None,
            required: bool = True, default=None, aliases: tuple[str, ...] = ()) -> None:
    """``-o/--out`` on a command that writes ``what``.

    ``positional`` keeps an older spelling, an optional positional argument of that
    metavar (``phantom OUTDIR`` as well as ``phantom -o OUTDIR``); :func:`settle_out`
    merges the two after parsing.  ``aliases`` are further option strings (``--output``).
    """
    if positional is not None:
        p.add_argument("out_positional", nargs="?", metavar=positional,
                       help=f"{what} (the same as -o)")
    p.add_argument("-o", "--out", *aliases, dest="out", metavar=positional or "OUT",
                   default=default, help=what)
    p.set_defaults(out_required=required, out_parser=p)


def settle_out(args: argparse.Namespace) -> None:
    """Merge a positional output into ``args.out``; a missing one, or two that differ,
    are usage errors (``napari-pvs COMMAND: error: ...``, exit 2)."""
    p = getattr(args, "out_parser", None)
    if p is None:
        return
    given = getattr(args, "out_positional", None)
    if given is not None:
        if args.out is not None and args.out != given:
            p.error(f"two outputs given ({given} and -o {args.out}); give one")
        args.out = given
    if args.out_required and args.out is None:
        p.error("the following arguments are required: -o/--out")


def add_store(p: argparse.ArgumentParser, what: str, *, required: bool = True) -> None:
    """``--store S``: a corrections store folder (``NAME.pvs.zarr``)."""
    p.add_argument("--store", required=required, metavar="STORE",
                   help=f"corrections store folder (NAME.pvs.zarr) {what}")


def add_device(p: argparse.ArgumentParser, what: str) -> None:
    """``--device``, ``auto`` by default: CUDA, then Apple MPS, then the CPU."""
    p.add_argument("--device", default="auto",
                   help=f"device {what}: auto (CUDA, then MPS, then CPU; the default), cpu, "
                        "cuda, cuda:N or mps")


def resolve_device(device: str | None) -> str:
    """A concrete device (``cuda``, ``mps``, ``cpu``...) for ``auto``; a bad one is refused."""
    return pick_device(None if device in (None, "auto") else device)


def duration(seconds: float) -> str:
    """``12.3 s``, ``4 min 05 s`` or ``2 h 03 min``."""
    if not math.isfinite(seconds):
        return "?"
    s = max(seconds, 0.0)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _count(event) -> tuple[float | None, float | None]:
    """``(done, total)`` of an inference, training or evaluation event; None when unusable."""
    done = getattr(event, "done", None)
    if done is None:
        done = getattr(event, "iteration", None)
    if not isinstance(done, (int, float)) or not math.isfinite(done):
        return None, None
    total = getattr(event, "total", None)
    ok = isinstance(total, (int, float)) and math.isfinite(total) and total > 0
    return done, (total if ok else None)


class ProgressReport:
    """Progress of a long command on ``stream`` (stderr by default).

    On a terminal, a one-line bar redrawn in place.  Otherwise (a pipe, a log file, a
    cluster job) one line each time another ``step`` percent is done, with the time
    elapsed and an estimate of the time left::

        train: 25% (50/200), 31.0 s elapsed, about 1 min 33 s left

    It takes inference :class:`~napari_pvs.inference.Progress` events and evaluation
    events (``done`` of ``total``) and training events (``iteration`` of ``total``).
    Without a positive ``total`` the bar shows the count alone and the log stays quiet.
    """

    def __init__(self, label: str, stream=None, *, step: float = 5.0):
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.step = float(step)
        self.t0 = time.perf_counter()
        self._next = self.step  # percentage of the next log line
        self._total = None
        self._start = (self.t0, 0.0)  # time and count of the stage's first event
        self._frame = ""

    def __call__(self, event) -> None:
        done, total = _count(event)
        if done is None:
            return
        if self.tty:
            self._draw(done, total)
        elif total is not None:
            self._log(done, total)

    def note(self, text: str) -> None:
        """Print ``text`` on stdout without tearing a bar that is being drawn."""
        if self.tty and self._frame:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        print(text, flush=True)
        if self.tty and self._frame:
            self.stream.write(self._frame)
            self.stream.flush()

    def _draw(self, done: float, total: float | None) -> None:
        elapsed = f"{time.perf_counter() - self.t0:5.1f}s"
        if total is None:
            self._frame = f"\r{self.label} {done:g} {elapsed}"
        else:
            bar = "#" * int(30 * min(max(done / total, 0.0), 1.0))
            self._frame = f"\r{self.label} [{bar:<30}] {done:g}/{total:g} {elapsed}"
        self.stream.write(self._frame)
        if total is not None and done >= total:
            self.stream.write("\n")
            self._frame = ""
        self.stream.flush()

    def _log(self, done: float, total: float) -> None:
        now = time.perf_counter()
        if total != self._total:  # a new stage (or the first event): count from here
            self._total, self._next, self._start = total, self.step, (now, done)
        frac = min(max(done / total, 0.0), 1.0)
        pct = 100.0 * frac
        if frac <= 0 or pct + 1e-9 < self._next:
            return
        self._next = (math.floor(pct / self.step + 1e-9) + 1) * self.step
        line = (f"{self.label}: {pct:3.0f}% ({done:g}/{total:g}), "
                f"{duration(now - self.t0)} elapsed")
        # the rate since the stage's first event: loading data or a model is not work done
        t1, d1 = self._start
        if d1 < done < total:
            line += f", about {duration((now - t1) * (total - done) / (done - d1))} left"
        self.stream.write(line + "\n")
        self.stream.flush()
