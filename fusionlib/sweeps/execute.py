"""Run planned runs: one notebook with papermill, one run into its folder, a whole sweep on an executor.

Each run writes its own folder ``<out>/<run name>/`` (:func:`execute_run`):
``parameters.json``, the executed ``<notebook>.ipynb``, ``log.txt`` (every
cell's printed output, from papermill's ``stdout_file`` / ``stderr_file``) and
``status.json``. ``summary.csv`` / ``summary.md`` are rewritten after every
finished run, one row per planned run.

The notebook's kernel starts in the notebook's own folder, so it reads files
beside it; the calling process never changes its working directory (papermill's
``cwd`` would ``chdir`` the whole process, which mixes the folders of runs that
share a process). Output folders are made absolute before anything runs.

Runs go to any :class:`concurrent.futures.Executor` (:func:`run_sweep`): a
process pool here (:func:`local_executor`), ``dask.distributed``'s
``Client.get_executor()`` on a cluster (:func:`dask_executor`, worker processes).
Each run's kernel gets ``OMP_NUM_THREADS = cores // workers`` and its own IPC
socket folder. A folder is held by one sweep at a time (``sweep.lock``).
``resume=True`` reruns every run not ``ok``, after checking that the grid is the
stored plan and that no run recorded ``running`` is still alive. Pool workers die
with the sweep (``PR_SET_PDEATHSIG`` on Linux) and ignore Ctrl-C; the sweep
catches it, stops the runs in flight (recorded ``interrupted``), starts no new
one, and raises :class:`SweepInterrupted`. A run whose worker dies is run once
more; dying twice records it as failed (``WorkerDied``).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as _dt
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TextIO

from fusionlib.display import progress
from fusionlib.experiments import read_records
from fusionlib.sweeps.plan import FolderInUse, RunSpec, SweepError, _label, check_timeout
from fusionlib.sweeps.results import (PLAN_FILE, STATUS_FILE, RunResult, load_plan, read_json,
                                      run_result, write_json, write_summary)

__all__ = ["run_notebook", "execute_run", "run_sweep", "local_executor", "dask_executor", "default_workers",
           "threads_per_run", "new_run_dir", "SweepInterrupted", "LOCK_FILE"]

LOCK_FILE = "sweep.lock"
#: Runs whose worker died are run again this many times before they are recorded as failed.
WORKER_DEATH_RETRIES = 1
#: A pool that breaks this many times before a run could start stops the sweep (workers that cannot start).
UNSTARTED_LIMIT = 3


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a sweep: the runs in flight are recorded ``interrupted``, the rest did not start."""

    def __init__(self, out: Path, interrupted: Sequence[str], not_started: Sequence[str]) -> None:
        super().__init__(f"interrupted: {len(interrupted)} run(s) stopped and recorded as interrupted, "
                         f"{len(not_started)} not started")
        self.out, self.interrupted, self.not_started = out, list(interrupted), list(not_started)


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- one notebook


def _ipc_kernel_manager_class(socket_dir: str | Path, cwd: str | Path, env: Mapping[str, str] | None = None,
                              output: TextIO | None = None):
    """A kernel manager whose kernel starts in ``cwd`` and talks over IPC sockets in ``socket_dir``.

    The kernel's working directory is set for the kernel process only (the
    caller's ``os.getcwd()`` never changes). IPC opens no port and spares every
    run the "running over TCP without encryption" warning; the sockets and the
    connection file live in ``socket_dir`` (absolute), private to the run. ``env``
    is added to the kernel's environment only. ``output`` (an open file) receives
    what the kernel process itself writes to stdout / stderr (not the cells'
    output, which papermill captures), e.g. its complaints when the sweep is stopped.
    """
    from jupyter_client.manager import AsyncKernelManager

    ip = os.path.join(os.path.abspath(socket_dir), "kernel-ipc")
    extra_env = dict(env or {})
    kernel_cwd = os.path.abspath(cwd)

    class IpcKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = ip
            self.connection_file = os.path.join(os.path.abspath(socket_dir), "kernel.json")

        async def _async_pre_start_kernel(self, **kw: Any):
            kw["cwd"] = kernel_cwd
            if output is not None:
                kw["stdout"] = kw["stderr"] = output
            if extra_env:
                kw["env"] = {**(kw.get("env") or os.environ), **extra_env}
            return await super()._async_pre_start_kernel(**kw)

    return IpcKernelManager


def run_notebook(
    notebook: str | Path,
    output: str | Path,
    parameters: dict[str, Any] | None = None,
    kernel_name: str = "python3",
    timeout: float | None = None,
    log: TextIO | None = None,
    on_cell_start: Any = None,
    env: dict[str, str] | None = None,
) -> RunResult:
    """Execute one notebook with papermill, its kernel in the notebook's folder; never raises for a failing notebook.

    ``timeout`` is papermill's ``execution_timeout`` (seconds one cell may run;
    the run then ends with status ``"timeout"``). ``log`` (an open text file)
    receives the cells' printed output; ``on_cell_start(cell=, cell_index=)`` is
    nbclient's hook; ``env`` adds environment variables for the kernel only.
    A failed run keeps the notebook's exception as ``ename`` / ``evalue``.
    """
    import papermill as pm

    notebook, output = Path(notebook).resolve(), Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    parameters = dict(parameters or {})
    start = time.perf_counter()
    status, ename, evalue = "ok", "", ""
    socket_dir = tempfile.mkdtemp(prefix="fusionlib-ipc-")  # private to this run; removed below
    hooks = {"on_cell_start": on_cell_start} if on_cell_start is not None else {}
    try:
        _on_own_event_loop(lambda: pm.execute_notebook(
            str(notebook),
            str(output),
            parameters=parameters,
            kernel_name=kernel_name,
            progress_bar=False,
            stdout_file=log,
            stderr_file=log,
            execution_timeout=timeout,
            kernel_manager_class=_ipc_kernel_manager_class(socket_dir, notebook.parent, env, log),
            **hooks,
        ))
    except Exception as exc:  # papermill raises PapermillExecutionError (ename / evalue) and friends
        status, ename, evalue = _describe_failure(exc)
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    records = read_records(output) if output.exists() else {}
    error = f"{ename}: {evalue}" if status != "ok" else ""
    return RunResult(notebook.name, str(output), status, seconds, parameters, records, error, ename, evalue)


def _on_own_event_loop(fn: Any) -> Any:
    """Call ``fn``; off the main thread, in a fresh ``contextvars`` context, closing the loop it made.

    jupyter_core keeps its event loop in a context variable; threads that run
    tasks in a copy of their submitter's context (Dask's threads do) would all
    share the submitter's loop and fail with "This event loop is already running".
    """
    import contextvars

    if threading.current_thread() is threading.main_thread():
        return fn()
    try:
        return contextvars.Context().run(fn)
    finally:
        import asyncio

        try:
            loop = asyncio.get_event_loop_policy().get_event_loop()
        except Exception:  # no loop was set in this thread
            loop = None
        if loop is not None and not loop.is_running():
            loop.close()
            asyncio.set_event_loop(None)


def _describe_failure(exc: BaseException) -> tuple[str, str, str]:
    """(status, ename, evalue) of a failed run: ``timeout`` for a cell that ran past the timeout."""
    if hasattr(exc, "ename"):  # PapermillExecutionError: the notebook's own exception
        return "failed", str(exc.ename), str(exc.evalue).strip()
    lines = str(exc).strip().splitlines()
    status = "timeout" if isinstance(exc, TimeoutError) or type(exc).__name__ == "CellTimeoutError" else "failed"
    return status, type(exc).__name__, (lines[0] if status == "timeout" and lines else lines[-1] if lines else "")


def new_run_dir(root: str | Path = "runs") -> Path:
    """``<root>/<timestamp>/``, created and absolute (a suffix keeps two runs in one second apart)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise SweepError(f"no free folder name under {root} for {stamp}")


# ---------------------------------------------------------------------------------------------- one run


def execute_run(spec: RunSpec | Mapping[str, Any], out_dir: str | Path, timeout: float | None = None,
                threads: int = 1, attempt: int = 1) -> dict[str, Any]:
    """Run one planned run into ``out_dir/<name>/``; the final status (what ``status.json`` holds).

    Never raises for a failing notebook; Ctrl-C (``KeyboardInterrupt``) records the
    run ``interrupted`` and is raised again. ``timeout`` is papermill's
    ``execution_timeout``. The kernel gets ``OMP_NUM_THREADS = MKL_NUM_THREADS =
    threads``. ``log.txt`` starts afresh with each attempt. Top-level, so a
    process pool or Dask can ship it.
    """
    if not isinstance(spec, RunSpec):
        spec = RunSpec(**spec)
    run_dir = Path(out_dir).resolve() / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    notebook = Path(spec.notebook)
    write_json(run_dir / "parameters.json", {"notebook": spec.notebook, "parameters": spec.parameters})
    # papermill adds a cell of injected parameters
    n_cells = len(json.loads(notebook.read_text()).get("cells", [])) + (1 if spec.parameters else 0)
    status: dict[str, Any] = {"status": "running", "notebook": notebook.name, "cell": 0, "cells": n_cells,
                              "started": _now(), "host": socket.gethostname(), "pid": os.getpid(),
                              "attempt": attempt, "threads": threads}
    write_json(run_dir / STATUS_FILE, status)
    partial = run_dir / f"{notebook.stem}.partial.ipynb"
    final = run_dir / f"{notebook.stem}.ipynb"
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(run_dir / "log.txt", "w", encoding="utf-8") as log:
        log.write(f"{spec.name}: attempt {attempt}, started {status['started']}\n")
        log.flush()

        def on_cell_start(cell: Any = None, cell_index: int = 0, **_: Any) -> None:
            status["cell"] = min(cell_index + 1, n_cells)
            write_json(run_dir / STATUS_FILE, status)
            log.write(f"--- cell {status['cell']}/{n_cells}\n")
            log.flush()

        try:
            result = run_notebook(notebook, partial, spec.parameters, timeout=timeout, log=log,
                                  on_cell_start=on_cell_start, env=env)
        except KeyboardInterrupt:
            log.write("--- interrupted (Ctrl-C)\n")
            status.update(status="interrupted", seconds=round(time.perf_counter() - start, 3), ename="Interrupted",
                          evalue="stopped by Ctrl-C", records={}, finished=_now())
            write_json(run_dir / STATUS_FILE, status)
            raise
        log.write(f"--- {result.status} after {result.seconds:.1f} s" + (f": {result.error}" if result.error else "")
                  + "\n")
    if partial.exists():
        os.replace(partial, final)
    status.update(status=result.status, seconds=round(result.seconds, 3), ename=result.ename,
                  evalue=result.evalue, records=result.records, finished=_now(),
                  output=f"{spec.name}/{final.name}")  # relative to the sweep folder
    write_json(run_dir / STATUS_FILE, status)
    return status


# ---------------------------------------------------------------------------------------------- executors


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def threads_per_run(workers: int, cores: int | None = None) -> int:
    """Threads for each run's kernel so that ``workers`` runs do not oversubscribe ``cores``."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise SweepError(f"workers must be a positive integer, got {workers!r}")
    return max(1, (cores or default_workers()) // workers)


def _die_with_parent(parent: int) -> None:
    """In a worker process: ignore Ctrl-C (the sweep handles it) and die when ``parent`` dies.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere a thread that watches the parent.
    The worker's kernel notices its parent is gone (ipykernel's parent poller) and exits too.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        return

    def watch() -> None:  # pragma: no cover - not Linux
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _kill_pool(pool: cf.Executor) -> None:
    """Stop a process pool now: queued work cancelled, its worker processes killed."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        with contextlib.suppress(Exception):
            p.kill()
    for p in processes:
        with contextlib.suppress(Exception):
            p.join(timeout=5)


@contextlib.contextmanager
def local_executor(workers: int) -> Iterator[Callable[[], cf.Executor]]:
    """A factory of process pools with ``workers`` processes (a new one after a worker dies); all stopped at exit.

    Workers start with ``spawn`` (a fresh interpreter, no forked copy of the
    caller's threads and locks), ignore Ctrl-C and die with this process.
    """
    import multiprocessing

    made: list[cf.Executor] = []

    def make() -> cf.Executor:
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_die_with_parent, initargs=(os.getpid(),))
        made.append(pool)
        return pool

    try:
        yield make
    finally:
        for pool in made:
            _kill_pool(pool)


@contextlib.contextmanager
def dask_executor(workers: int, scheduler: str | None = None) -> Iterator[Callable[[], cf.Executor]]:
    """``Client.get_executor()`` on the cluster at ``scheduler``, or on a new ``LocalCluster`` of ``workers``.

    The LocalCluster runs each worker as a process of its own with one thread,
    so every run has a process of its own. Dask is imported here only: it is the
    optional extra ``fusionlib[dask]``.
    """
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:
        raise SweepError("--executor dask needs Dask: pip install 'fusionlib[dask]' "
                         "(or pip install 'dask[distributed]')") from exc
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        yield lambda: client.get_executor(pure=False)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# ---------------------------------------------------------------------------------------------- the sweep


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_folder(out: Path, runs: Sequence[RunSpec], resume: bool) -> None:
    """A new sweep needs an unused folder; a resumed one the same plan and no run still alive."""
    stored = load_plan(out)
    if stored is None:
        started = sorted(p.name for p in out.iterdir() if (p / STATUS_FILE).exists()) if out.exists() else []
        if started and not resume:
            raise FolderInUse(f"{out} already holds runs ({started[0]}, ...); pass --resume to continue there, "
                              "or choose another --out", out)
        return
    if not resume:
        raise FolderInUse(f"{out} already holds a sweep ({len(stored)} runs); pass --resume to "
                          "continue it, or choose another --out", out)
    old = {r.name: r for r in stored}
    new = {r.name: r for r in runs}
    differ = []
    for n, run in new.items():
        if n not in old:
            differ.append(f"{n} (not in the stored plan)")
        elif run.notebook != old[n].notebook:
            differ.append(f"{n} (notebook {run.notebook}, was {old[n].notebook})")
        elif json.dumps(run.parameters, sort_keys=True) != json.dumps(old[n].parameters, sort_keys=True):
            differ.append(f"{n} (parameters {run.parameters}, were {old[n].parameters})")
    differ += [f"{n} (not in this grid)" for n in old if n not in new]
    if differ:
        raise SweepError(f"--resume: this grid differs from the sweep stored in {out / PLAN_FILE}: "
                         f"{'; '.join(differ[:5])}" + (f"; and {len(differ) - 5} more" if len(differ) > 5 else "")
                         + ". Resume with the grid that started it, or choose another --out")
    host = socket.gethostname()
    for r in runs:
        status = read_json(out / r.name / STATUS_FILE) or {}
        if status.get("status") == "running" and status.get("host") == host and _pid_alive(status.get("pid")):
            raise SweepError(f"--resume: run {r.name} is still running (process {status['pid']}); wait for it "
                             f"to finish or stop it (kill {status['pid']}), then resume")


def run_sweep(runs: Sequence[RunSpec], out_dir: str | Path, executor: str = "local", workers: int | None = None,
              scheduler: str | None = None, resume: bool = False, timeout: float | None = None,
              show_progress: bool = True) -> list[RunResult]:
    """Run every planned run into ``out_dir``; one :class:`RunResult` per run, in plan order.

    ``executor`` is ``"local"`` (a process pool of ``workers``), ``"dask"`` (a
    Dask cluster at ``scheduler``, or a LocalCluster of ``workers``), or
    ``"serial"`` (this process, one run after another; what ``workers=1``
    locally means too). A folder is locked for the whole sweep; ``resume``
    reruns the runs not ``ok``. Writes ``summary.csv`` / ``summary.md`` after every
    run. Ctrl-C raises :class:`SweepInterrupted` once the folder is consistent.
    The local pool starts its workers with ``spawn``: a script that calls this
    must guard the call with ``if __name__ == "__main__":`` (the ``fusionlib``
    command and Jupyter need nothing).
    """
    from filelock import FileLock, Timeout

    if executor not in ("local", "dask", "serial"):
        raise SweepError(f"executor must be 'local', 'dask' or 'serial', got {executor!r}")
    if executor == "dask":
        import importlib.util

        if importlib.util.find_spec("distributed") is None:
            raise SweepError("--executor dask needs Dask: pip install 'fusionlib[dask]' "
                             "(or pip install 'dask[distributed]')")
    workers = default_workers() if workers is None else workers
    threads = threads_per_run(workers)
    timeout = check_timeout(timeout)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    lock_path = out / LOCK_FILE
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SweepError(f"another sweep is writing to {out} (it holds {lock_path}); wait for it to "
                         "finish, or choose another --out") from None
    try:
        _check_folder(out, runs, resume)
        write_json(out / PLAN_FILE, {"runs": [r.as_dict() for r in runs], "written": _now()})
        statuses: dict[str, Any] = {r.name: read_json(out / r.name / STATUS_FILE) if resume else None for r in runs}
        todo = [r for r in runs if (statuses[r.name] or {}).get("status") != "ok"]
        for r in todo:  # an unfinished or older status of a run about to run again
            (out / r.name / STATUS_FILE).unlink(missing_ok=True)
        results = {r.name: run_result(r, statuses[r.name]) for r in runs}
        for r in todo:
            results[r.name] = run_result(r, None)
        write_summary([results[r.name] for r in runs], out)
        bar = progress(None, total=len(runs), desc="sweep", unit="run", enabled=show_progress)
        bar.update(len(runs) - len(todo))

        def finish(spec: RunSpec, status: dict[str, Any]) -> None:
            results[spec.name] = run_result(spec, status)
            write_summary([results[r.name] for r in runs], out)
            bar.update(1)

        try:
            if executor == "serial" or (executor == "local" and workers == 1):
                _run_serial(todo, out, timeout, threads, bar, finish, results)
            else:
                factory_cm = local_executor(workers) if executor == "local" else dask_executor(workers, scheduler)
                with factory_cm as factory:
                    _run_parallel(todo, out, timeout, threads, factory, bar, finish, results)
        except KeyboardInterrupt:
            raise _record_interrupted(out, runs, todo, results) from None
        finally:
            bar.close()
        return [results[r.name] for r in runs]
    finally:
        lock_path.unlink(missing_ok=True)
        lock.release()


def _record_interrupted(out: Path, runs: Sequence[RunSpec], todo: Sequence[RunSpec],
                        results: dict[str, RunResult]) -> SweepInterrupted:
    """After Ctrl-C: every run left ``running`` becomes ``interrupted``; the summary matches the folders."""
    stopped, not_started = [], []
    for spec in todo:
        path = out / spec.name / STATUS_FILE
        status = read_json(path)
        if status is None or status.get("status") == "queued":
            path.unlink(missing_ok=True)
            not_started.append(spec.name)
            continue
        if status.get("status") == "running":
            started = _dt.datetime.fromisoformat(status["started"]) if status.get("started") else None
            status.update(status="interrupted", ename="Interrupted", evalue="stopped by Ctrl-C", records={},
                          finished=_now(),
                          seconds=round((_dt.datetime.now() - started).total_seconds(), 3) if started else 0.0)
            write_json(path, status)
        if status.get("status") == "interrupted":
            stopped.append(spec.name)
        results[spec.name] = run_result(spec, status)
    write_summary([results[r.name] for r in runs], out)
    return SweepInterrupted(out, stopped, not_started)


def _postfix(results: Mapping[str, RunResult], running: str = "") -> str:
    states = [r.status for r in results.values()]
    text = f"ok {states.count('ok')} failed {len(states) - states.count('ok') - states.count('pending')} " \
           f"left {states.count('pending')}"
    return f"{text} | {running}" if running else text


def _short_labels(runs: Sequence[RunSpec]) -> dict[str, str]:
    """Run name -> notebook stem and the parameter values that vary across ``runs``, for the bar's text."""
    keys = [k for k in dict.fromkeys(k for r in runs for k in r.parameters)
            if len({json.dumps(r.parameters.get(k), sort_keys=True, default=str) for r in runs}) > 1]
    labels = {}
    for r in runs:
        stem = Path(r.notebook).stem
        stem = stem if len(stem) <= 24 else stem[:21] + "..."
        labels[r.name] = " ".join([stem] + [f"{k}={_label(r.parameters[k])}"[:24] for k in keys if k in r.parameters])
    return labels


def _cell_text(out: Path, spec: RunSpec, label: str) -> str:
    status = read_json(out / spec.name / STATUS_FILE) or {}
    if status.get("status") != "running":
        return ""
    cell = status.get("cell", 0)
    return f"{label} " + (f"cell {cell}/{status.get('cells', '?')}" if cell else "starting")


def _run_serial(todo, out, timeout, threads, bar, finish, results) -> None:
    labels = _short_labels(todo)
    for spec in todo:
        bar.set_postfix_str(_postfix(results, labels[spec.name]), refresh=True)
        finish(spec, execute_run(spec, out, timeout, threads))
    bar.set_postfix_str(_postfix(results), refresh=True)


def _worker_died(out: Path, spec: RunSpec, exc: BaseException, attempt: int) -> dict[str, Any]:
    status = read_json(out / spec.name / STATUS_FILE) or {}
    status.update(status="failed", ename="WorkerDied", evalue=f"the worker running it ended ({type(exc).__name__}: "
                  f"{exc}) on attempt {attempt}", finished=_now(), records=status.get("records") or {})
    status.setdefault("seconds", 0.0)
    (out / spec.name).mkdir(parents=True, exist_ok=True)
    write_json(out / spec.name / STATUS_FILE, status)
    return status


def _run_parallel(todo, out, timeout, threads, factory, bar, finish, results) -> None:
    attempts = {spec.name: 1 for spec in todo}
    unstarted: dict[str, int] = {}
    labels = _short_labels(todo)
    queue = list(todo)
    while queue:
        pool = factory()
        futures = {pool.submit(execute_run, spec, str(out), timeout, threads, attempts[spec.name]): spec
                   for spec in queue}
        queue = []
        shown = ""
        try:
            while futures:
                done, _ = cf.wait(futures, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    spec = futures.pop(fut)
                    try:
                        finish(spec, fut.result())
                    except Exception as exc:  # the worker died (BrokenProcessPool, dask's KilledWorker, ...)
                        started = (read_json(out / spec.name / STATUS_FILE) or {}).get("status") == "running"
                        if not started and isinstance(exc, cf.BrokenExecutor):
                            unstarted[spec.name] = unstarted.get(spec.name, 0) + 1
                            if unstarted[spec.name] > UNSTARTED_LIMIT:
                                raise SweepError(
                                    f"the worker processes stopped {unstarted[spec.name]} times before {spec.name} "
                                    "started. A script that calls run_sweep must guard it with "
                                    "`if __name__ == \"__main__\":` (the pool starts its workers with 'spawn', "
                                    "which imports the script again)") from exc
                            queue.append(spec)  # never started: the pool broke under it
                        elif attempts[spec.name] <= WORKER_DEATH_RETRIES:
                            attempts[spec.name] += 1
                            write_json(out / spec.name / STATUS_FILE,
                                       {"status": "queued", "attempt": attempts[spec.name]})
                            queue.append(spec)
                        else:
                            finish(spec, _worker_died(out, spec, exc, attempts[spec.name]))
                running = [_cell_text(out, s, labels[s.name]) for s in futures.values()]
                text = _postfix(results, "; ".join(t for t in running if t))
                if text != shown:
                    bar.set_postfix_str(text, refresh=True)
                    shown = text
        except KeyboardInterrupt:
            for fut in futures:
                fut.cancel()
            if isinstance(pool, cf.ProcessPoolExecutor):
                _kill_pool(pool)
            raise  # a Dask cluster is closed by dask_executor on the way out
    bar.set_postfix_str(_postfix(results), refresh=True)
