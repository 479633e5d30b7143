"""Run one function in a spawned process beside this one, on its own share of the CPU threads.

Why: a small model's training step on a CPU is bound by its count of small ops, not by arithmetic, so a second
thread speeds it up little (the slotmatch student: 1.1-1.2x), while two such trainings, each on one thread in its
own process, finish together much sooner than one after the other on two threads (150 steps of the distilled and
of the lone student: 18.3 s side by side against 25.3 s in turn, 2 cores).

The child is told to stop (SIGTERM, which :func:`kdfast.train.loop.fit` answers by finishing its step and writing
a checkpoint) when this process leaves the ``with`` block early, and stops itself the same way when this process
dies (checked every half second), so no training is left running unattended. Denormal floats are flushed to zero in
the child, as ``kdfast train`` does in the main process.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Self

import torch


class Background:
    """``fn(*args)`` in a spawned process on ``threads`` torch threads; :meth:`result` waits for its value.

    ``fn`` and ``args`` must pickle (a module-level function; tensors and modules do). An exception raised by ``fn``
    is raised again by :meth:`result` (an unpicklable one as a RuntimeError carrying its traceback)."""

    def __init__(self, fn: Callable[..., Any], *args: Any, threads: int):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools in an unusable state
        self._receive, send = context.Pipe(duplex=False)
        # Plain pickle bytes both ways: torch's multiprocessing pickler would share tensors as file descriptors,
        # which outlive neither side's exit.
        job = pickle.dumps((fn, args))
        self._process = context.Process(target=_child, args=(job, threads, os.getpid(), send), daemon=True)
        self._process.start()
        send.close()
        self._done = False

    def result(self) -> Any:
        """The function's return value (waits for it); its exception raised here."""
        try:
            kind, value = pickle.loads(self._receive.recv_bytes())
        except EOFError:  # the child died without a word (killed, out of memory)
            self._process.join()
            raise RuntimeError(f"the background training process ended with exit code {self._process.exitcode} "
                               "before it finished") from None
        finally:
            self._done = True
        self._process.join()
        if kind == "error":
            raise value
        return value

    def stop(self, timeout: float = 120.0) -> None:
        """Ask the child to stop (SIGTERM: a training step is finished and checkpointed first) and wait for it."""
        if self._process.is_alive():
            os.kill(self._process.pid, signal.SIGTERM)
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None or not self._done:
            self.stop()


def _child(job: bytes, threads: int, parent: int, send) -> None:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()
    try:
        fn, args = pickle.loads(job)
        reply = pickle.dumps(("done", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent, KeyboardInterrupt included
        reply = pickle.dumps(("error", _picklable(exc)))
    try:
        send.send_bytes(reply)
    except (BrokenPipeError, OSError):  # the parent is gone: nobody to tell
        pass


def _stop_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any failure to round-trip
        text = "".join(traceback.format_exception(exc)).rstrip()
        return RuntimeError(f"{type(exc).__name__} in the background training process: {exc}\n{text}")
