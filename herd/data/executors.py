"""Executors run one function over many independent tasks: local worker processes, or a Ray cluster.

Both return results in task order, and every task writes its own files, so the output never depends on which worker
ran what, or how many there were: ``--workers 1``, ``--workers 8`` and ``--executor ray`` give the same bytes.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.connection import wait as wait_for_connections
from typing import Any

from tqdm import tqdm


class WorkerDiedError(RuntimeError):
    """A worker process ended without answering (killed by the OS, a signal, or a crash in native code)."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as the ``__cause__`` of the re-raised exception."""

    def __str__(self) -> str:
        return self.args[0]


class WorkerProcesses:
    """``n`` worker processes, each with its own pipe, that map a function over items in order.

    Why not ``multiprocessing.Pool``: its workers share one queue lock for results. A worker killed while it holds
    that lock (a SIGTERM sent to the whole process group, as job schedulers and ``timeout`` do; the OOM killer)
    leaves ``Pool.terminate()`` waiting for the lock forever, so the parent hangs instead of exiting. Here each
    pipe has exactly one writer and one reader, nothing is shared, and stopping is killing and joining the workers.

    Each worker holds one batch at a time; the parent sends a worker its next batch only after receiving its result,
    so neither side can block writing to the other (no deadlock, however large the batches). Workers ignore SIGINT:
    a Ctrl-C reaches the whole process group, and the parent alone decides what to do with it.
    """

    def __init__(self, n: int, context: str = "spawn", initializer: Callable | None = None, initargs: tuple = ()):
        ctx = mp.get_context(context)
        self._procs, self._conns = [], []
        with _sigint_ignored():  # inherited from the workers' first instruction, before Python installs its handler
            for _ in range(n):
                parent_end, child_end = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=_worker_main, args=(child_end, initializer, initargs), daemon=True)
                proc.start()
                child_end.close()
                self._procs.append(proc)
                self._conns.append(parent_end)

    def imap(self, fn: Callable, items: Iterable[Any]) -> Iterator[Any]:
        """``fn(item)`` for each item, computed on the workers, yielded in input order. An exception raised by ``fn``
        is raised here, at its item's turn. Any exception or early stop here kills the workers (``close`` after)."""
        items = iter(items)
        idle = list(range(len(self._procs)))[::-1]
        owner: dict[int, int] = {}  # worker -> sequence number of the item it holds
        done: dict[int, tuple[bool, Any]] = {}
        sent = yielded = 0
        exhausted = False
        try:
            while True:
                while idle and not exhausted:  # keep every worker busy before handing anything out
                    try:
                        item = next(items)
                    except StopIteration:
                        exhausted = True
                        break
                    w = idle.pop()
                    self._conns[w].send((fn, item))
                    owner[w] = sent
                    sent += 1
                if yielded in done:
                    ok, value = done.pop(yielded)
                    yielded += 1
                    if not ok:
                        raise value
                    yield value
                    continue
                if not owner:
                    return
                ready = wait_for_connections([self._conns[w] for w in owner])
                for w in [w for w in owner if self._conns[w] in ready]:
                    done[owner.pop(w)] = self._receive(w)
                    idle.append(w)
        except BaseException:
            self.kill()
            raise

    def _receive(self, w: int) -> tuple[bool, Any]:
        try:
            ok, value, remote_tb = self._conns[w].recv()
        except (EOFError, OSError):
            proc = self._procs[w]
            proc.join(timeout=5)
            code = proc.exitcode
            # A signal sent to the whole process group reaches this process too: give its handler (Ctrl-C, SIGTERM)
            # the moment it needs to run, so that the stop reads as the interruption it is.
            time.sleep(0.2)
            how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited ({code})"
            raise WorkerDiedError(f"worker process {w} (pid {proc.pid}) {how} while working") from None
        if not ok and remote_tb:
            value.__cause__ = RemoteTraceback(remote_tb)
        return ok, value

    def kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        self._join()

    def close(self) -> None:
        """Ask each worker to finish and wait for it."""
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        self._join()

    def _join(self) -> None:
        for proc in self._procs:
            proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def __enter__(self) -> WorkerProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.kill()


def _worker_main(conn, initializer: Callable | None, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # should anything have reinstalled a handler (see the class doc)
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent has gone
            return
        if message is None:
            return
        fn, item = message
        try:
            reply = (True, fn(item), None)
        except Exception as e:
            reply = (False, e, traceback.format_exc())
        try:
            conn.send(reply)
        except Exception as e:  # the result or the exception does not pickle: say so rather than die silently
            conn.send((False, RuntimeError(f"worker could not send back its result: {e!r}"), traceback.format_exc()))


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class LocalExecutor:
    """``workers`` processes (forked on Linux: no re-import; the parent has started no threads yet); 1 runs inline."""

    def __init__(self, workers: int = 1):
        self.workers = max(1, workers)
        self._pool = None

    def map(self, fn: Callable, tasks: Sequence[Any], desc: str = "", weights: Sequence[int] | None = None,
            progress: bool = True, unit: str = "task") -> list:
        bar = tqdm(total=sum(weights) if weights else len(tasks), desc=desc, unit=unit, disable=not progress,
                   dynamic_ncols=True)
        results: list = [None] * len(tasks)
        try:
            if self.workers == 1 or len(tasks) <= 1:
                for i, task in enumerate(tasks):
                    results[i] = fn(task)
                    bar.update(weights[i] if weights else 1)
            else:
                if self._pool is None:
                    self._pool = WorkerProcesses(self.workers, "fork" if sys.platform == "linux" else "spawn")
                try:
                    for i, result in enumerate(self._pool.imap(fn, tasks)):
                        results[i] = result
                        bar.update(weights[i] if weights else 1)
                except BaseException:
                    self._pool = None  # imap has killed its workers; the next map starts new ones
                    raise
        finally:
            bar.close()
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _indexed(item: tuple[Callable, int, Any]) -> tuple[int, Any]:
    fn, i, task = item
    return i, fn(task)


class RayExecutor:
    """Tasks as Ray remote functions: on a local Ray instance, or on a cluster (``address="HOST:PORT"``, started with
    ``ray start --head``). Every node must see the input and output paths (a shared file system)."""

    def __init__(self, address: str | None = None, workers: int | None = None):
        try:
            import ray
        except ImportError:
            from herd.data.readers import DataError

            raise DataError("--executor ray needs Ray: pip install 'herd[ray]'") from None
        self.ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            kwargs = {"address": address} if address else {"num_cpus": workers}
            ray.init(ignore_reinit_error=True, log_to_driver=False, include_dashboard=False, **kwargs)
        self._remote = ray.remote(_indexed)

    def map(self, fn: Callable, tasks: Sequence[Any], desc: str = "", weights: Sequence[int] | None = None,
            progress: bool = True, unit: str = "task") -> list:
        bar = tqdm(total=sum(weights) if weights else len(tasks), desc=desc, unit=unit, disable=not progress,
                   dynamic_ncols=True)
        pending = [self._remote.remote((fn, i, t)) for i, t in enumerate(tasks)]
        results: list = [None] * len(tasks)
        try:
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                i, result = self.ray.get(done[0])
                results[i] = result
                bar.update(weights[i] if weights else 1)
        finally:
            bar.close()
        return results

    def close(self) -> None:
        if self._owns:
            self.ray.shutdown()


def make_executor(kind: str, workers: int, ray_address: str | None = None):
    from herd.data.readers import DataError

    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(ray_address, workers)
    raise DataError(f"--executor {kind!r}: expected local or ray")
