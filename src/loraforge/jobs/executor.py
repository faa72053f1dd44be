"""Where a job's training runs: behind the :class:`Executor` protocol; the local one runs a subprocess.

``LocalExecutor`` runs loraforge's own commands (``python -m loraforge train --config JOB/train.yaml``,
then ``eval`` when the job asks for it) as child processes.
The child dies with the worker (Linux's parent-death signal), so a killed worker never leaves a
training process behind that a resumed job would race; and the worker's lock on the job directory
is inherited by the child, as a second guard: no other worker can start the job while it lives.
A Ray executor (``ray job submit``) can replace it without touching the worker.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

PR_SET_PDEATHSIG = 1
LOG_NAME = "train.log"


class Run(Protocol):
    """A training run in progress."""

    def poll(self) -> int | None:
        """The exit status once finished (0: success), else None."""
        ...

    def stop(self, grace_s: float) -> int:
        """Ask the run to stop (SIGTERM), kill it after ``grace_s`` seconds; its exit status."""
        ...

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the run's output."""
        ...


class Executor(Protocol):
    def start(self, args: Sequence[str], workdir: Path, *, keep_fds: Sequence[int] = ()) -> Run:
        """Start the loraforge command ``args`` (``["train", "--config", …]``, ``["eval", …]``) in ``workdir``."""
        ...


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the job lock still keeps a second worker away
        pass


class LocalRun:
    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log

    def poll(self) -> int | None:
        return self.process.poll()

    def stop(self, grace_s: float) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class LocalExecutor:
    """Training as a subprocess of the worker, on this machine."""

    def __init__(self, home: Path, *, python: str = sys.executable, threads: int | None = None) -> None:
        self.home = home
        self.python = python
        self.threads = threads

    def start(self, args: Sequence[str], workdir: Path, *, keep_fds: Sequence[int] = ()) -> Run:
        log = workdir / LOG_NAME
        command = [self.python, "-m", "loraforge", *args, "--home", str(self.home)]
        env = dict(os.environ)
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        with open(log, "ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
            out.flush()
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
                env=env,
                pass_fds=tuple(keep_fds),
                preexec_fn=_die_with_parent,
            )
        return LocalRun(process, log)
