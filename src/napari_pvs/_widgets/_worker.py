"""Start napari thread workers whose errors always reach the widget.

Two traps are avoided by never letting an exception leave the work function:

- superqt's worker treats a ``RuntimeError`` coming out of the work function as "the
  worker object was deleted" and drops it without emitting ``errored`` or
  ``finished``, and our cancellations (``PredictionCancelled``,
  ``TrainingCancelled``) and training failures are RuntimeErrors;
- napari 0.9's status-bar hook on ``errored`` itself raises a TypeError.

The work is wrapped: an exception is returned wrapped in a :class:`WorkerError`, and the
``returned`` handler dispatches it to ``errored`` with the original exception.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["WorkerError", "start_worker"]


class WorkerError:
    """Carries an exception of the work function past superqt (see the module docstring).

    Not an Exception itself: superqt re-raises a returned Exception instance.
    """

    def __init__(self, original: BaseException):
        self.original = original


def _shielded(func, *args, **kwargs):
    try:
        return (yield from func(*args, **kwargs))
    except Exception as exc:  # handed to the errored callback, on the GUI thread
        return WorkerError(exc)


def start_worker(func: Callable, *args, yielded=None, returned=None, errored=None, finished=None,
                 **kwargs):
    """Run generator function ``func(*args, **kwargs)`` in a napari thread worker.

    The callbacks run on the GUI thread; ``errored`` receives the original exception.
    Returns the started worker.
    """
    from napari.qt.threading import create_worker

    worker = create_worker(_shielded, func, *args, _start_thread=False, **kwargs)

    def _dispatch(result):
        if isinstance(result, WorkerError):
            if errored is not None:
                errored(result.original)
        elif returned is not None:
            returned(result)

    if yielded is not None:
        worker.yielded.connect(yielded)
    worker.returned.connect(_dispatch)
    if finished is not None:
        worker.finished.connect(finished)
    worker.start()
    return worker
