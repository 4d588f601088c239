"""Runs N copies of a command on this machine as the processes of one multi-process JAX job.

    python -m distill_jax.launch --local-processes 2 -- distill-jax train-student --config ...
    scripts/launch_local.sh 2 distill-jax train-student --config ...

This simulates a multi-host run (a TPU pod slice, a GPU cluster) on one machine: every
copy gets ``DISTILL_JAX_COORDINATOR=127.0.0.1:<free port>``, ``DISTILL_JAX_NUM_PROCESSES``
and its own ``DISTILL_JAX_PROCESS_ID`` (read by ``sharding.maybe_initialize_distributed``), and by
default runs on ``--devices-per-process`` simulated CPU devices (``XLA_FLAGS``) with gloo
cross-process collectives (``JAX_CPU_COLLECTIVES_IMPLEMENTATION``).

The launcher prefixes every output line of copy ``i`` with ``[i]``, forwards SIGINT and
SIGTERM to all copies, and, as soon as one copy fails (non-zero exit or killed by a
signal), stops the others (SIGTERM, then SIGKILL after ``--grace-period`` seconds): a
multi-process job cannot go on without one of its processes. It exits with 0 only if
every copy exited with 0 (also after a forwarded signal, if every copy stopped cleanly);
otherwise with the status of the first copy that failed (128 + signal number for a copy
killed by a signal).

Once ``jax.distributed`` is initialised, JAX catches SIGTERM as a preemption notice and
the process keeps running, so a JAX copy that is stopped with SIGTERM ends only with the
SIGKILL that follows after the grace period.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import BinaryIO

LOOPBACK = "127.0.0.1"
DEFAULT_DEVICES_PER_PROCESS = 4
DEFAULT_GRACE_PERIOD_S = 10.0
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")
_POLL_S = 0.05


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def child_environment(
    base: dict[str, str],
    *,
    process_id: int,
    num_processes: int,
    coordinator: str,
    devices_per_process: int | None,
) -> dict[str, str]:
    """The environment of copy ``process_id``.

    With ``devices_per_process`` set, the copy runs on that many simulated CPU devices:
    ``JAX_PLATFORMS=cpu`` and gloo collectives unless the caller's environment already
    chooses others, and the device-count flag of ``XLA_FLAGS`` replaced (other XLA flags
    are kept). With ``None`` the platform is left alone (e.g. one GPU per copy, chosen by
    the caller through ``CUDA_VISIBLE_DEVICES``).
    """
    env = dict(base)
    env["DISTILL_JAX_COORDINATOR"] = coordinator
    env["DISTILL_JAX_NUM_PROCESSES"] = str(num_processes)
    env["DISTILL_JAX_PROCESS_ID"] = str(process_id)
    if devices_per_process is not None:
        flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
        flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
        env["XLA_FLAGS"] = " ".join(flags)
        env.setdefault("JAX_PLATFORMS", "cpu")
        env.setdefault("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")
    env.setdefault("PYTHONUNBUFFERED", "1")  # prefixed lines show up as they are printed
    return env


def _child_setup() -> None:
    """Runs in each child before exec: its own process group (so that a signal reaches its
    sub-processes too, and a terminal's Ctrl-C reaches it only through the launcher) and,
    on Linux, SIGKILL when the launcher dies, so that no copy outlives it."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        except OSError:
            pass


def _pump(stream: BinaryIO, sink: BinaryIO, prefix: bytes, lock: threading.Lock) -> None:
    """Copies ``stream`` to ``sink`` line by line, each line prefixed."""
    for line in iter(stream.readline, b""):
        if not line.endswith(b"\n"):
            line += b"\n"
        with lock:
            sink.write(prefix + line)
            sink.flush()
    stream.close()


def exit_status(returncode: int) -> int:
    """A shell-style exit status: 128 + N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class LocalJob:
    """N copies of a command started together; see the module docstring."""

    def __init__(
        self,
        command: Sequence[str],
        num_processes: int,
        *,
        devices_per_process: int | None = DEFAULT_DEVICES_PER_PROCESS,
        port: int | None = None,
        grace_period_s: float = DEFAULT_GRACE_PERIOD_S,
        env: dict[str, str] | None = None,
        stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None,
    ):
        if num_processes < 1:
            raise ValueError(f"the number of processes must be at least 1, got {num_processes}")
        if not command:
            raise ValueError("no command to run")
        self.command = list(command)
        self.num_processes = num_processes
        self.devices_per_process = devices_per_process
        self.coordinator = f"{LOOPBACK}:{port or free_port()}"
        self.grace_period_s = grace_period_s
        self.env = dict(os.environ if env is None else env)
        self.stdout = stdout or sys.stdout.buffer
        self.stderr = stderr or sys.stderr.buffer
        self.processes: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._signal_received: int | None = None

    def log(self, message: str) -> None:
        with self._lock:
            self.stderr.write(f"[launch] {message}\n".encode())
            self.stderr.flush()

    def start(self) -> None:
        """Starts every copy (all before any output thread, as ``preexec_fn`` requires)."""
        for i in range(self.num_processes):
            env = child_environment(
                self.env,
                process_id=i,
                num_processes=self.num_processes,
                coordinator=self.coordinator,
                devices_per_process=self.devices_per_process,
            )
            try:
                proc = subprocess.Popen(
                    self.command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    preexec_fn=_child_setup,
                )
            except OSError as err:
                self.log(f"cannot start {self.command[0]!r}: {err}")
                self.terminate_all()
                raise
            self.processes.append(proc)
        for i, proc in enumerate(self.processes):
            prefix = f"[{i}] ".encode()
            for stream, sink in ((proc.stdout, self.stdout), (proc.stderr, self.stderr)):
                thread = threading.Thread(
                    target=_pump, args=(stream, sink, prefix, self._lock), daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def send(self, signum: int) -> None:
        """Sends ``signum`` to the process group of every copy still running."""
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signum)
                except ProcessLookupError:
                    pass

    def terminate_all(self) -> None:
        """SIGTERM to every running copy, SIGKILL to those left after the grace period."""
        self.send(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_period_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.processes):
            time.sleep(_POLL_S)
        if any(p.poll() is None for p in self.processes):
            self.log(f"copies still running after {self.grace_period_s:g} s; sending SIGKILL")
            self.send(signal.SIGKILL)
        for proc in self.processes:
            proc.wait()

    def _on_signal(self, signum: int, frame) -> None:
        del frame
        if self._signal_received is None:
            self._signal_received = signum
            self.send(signum)
        else:  # a second signal: stop waiting for a clean exit
            self.send(signal.SIGKILL)

    def wait(self) -> int:
        """Waits for the copies; returns the job's exit status (see the module docstring)."""
        failed: tuple[int, int] | None = None  # (process id, returncode)
        signal_deadline: float | None = None
        while any(p.poll() is None for p in self.processes):
            if failed is None:
                for i, proc in enumerate(self.processes):
                    code = proc.poll()
                    if code is not None and code != 0:
                        failed = (i, code)
                        how = (
                            f"was killed by signal {-code}"
                            if code < 0
                            else f"exited with status {code}"
                        )
                        if any(p.poll() is None for p in self.processes):
                            self.log(f"process {i} {how}; stopping the others")
                            self.terminate_all()
                        break
            if self._signal_received is not None and signal_deadline is None:
                signal_deadline = time.monotonic() + self.grace_period_s
            if signal_deadline is not None and time.monotonic() > signal_deadline:
                self.log(
                    f"copies still running {self.grace_period_s:g} s after signal "
                    f"{self._signal_received}; sending SIGKILL"
                )
                self.send(signal.SIGKILL)
                signal_deadline = float("inf")
            time.sleep(_POLL_S)
        for thread in self._threads:
            thread.join(timeout=5.0)
        codes = [p.returncode for p in self.processes]
        if failed is None:
            failed = next(((i, c) for i, c in enumerate(codes) if c != 0), None)
        if failed is not None:
            i, code = failed
            self.log(
                f"process {i} failed first (exit status {exit_status(code)}); "
                f"exit statuses: {[exit_status(c) for c in codes]}"
            )
            return exit_status(code)
        return 0  # every copy exited with 0 (after a forwarded signal, too: a clean stop)

    def run(self) -> int:
        """Starts the copies and waits for them, forwarding SIGINT and SIGTERM meanwhile
        (the handlers are installed only when called from the main thread)."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                handlers[signum] = signal.signal(signum, self._on_signal)
        try:
            self.start()
            return self.wait()
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            if any(p.poll() is None for p in self.processes):  # e.g. an exception above
                self.send(signal.SIGKILL)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m distill_jax.launch",
        description="Run N copies of COMMAND on this machine as one multi-process JAX job "
        "(coordinator on 127.0.0.1).",
    )
    parser.add_argument(
        "--local-processes", "-n", type=int, required=True, metavar="N", help="number of processes"
    )
    parser.add_argument(
        "--devices-per-process",
        type=int,
        default=int(os.environ.get("DEVICES_PER_PROCESS", DEFAULT_DEVICES_PER_PROCESS)),
        help="simulated CPU devices per process (env DEVICES_PER_PROCESS, "
        "default %(default)s); 0: leave the platform and XLA_FLAGS alone",
    )
    parser.add_argument(
        "--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)"
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=DEFAULT_GRACE_PERIOD_S,
        help="seconds between SIGTERM and SIGKILL when stopping the copies (default %(default)s)",
    )
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="the command (after --), e.g. -- distill-jax train-student ...",
    )
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        parser.error("no command given (put it after --)")
    if args.local_processes < 1:
        parser.error("--local-processes must be at least 1")
    if args.devices_per_process < 0:
        parser.error("--devices-per-process must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    job = LocalJob(
        args.command,
        args.local_processes,
        devices_per_process=args.devices_per_process or None,
        port=args.port,
        grace_period_s=args.grace_period,
    )
    job.log(
        f"{args.local_processes} processes, coordinator {job.coordinator}: "
        + " ".join(args.command)
    )
    try:
        return job.run()
    except OSError:
        return 127


if __name__ == "__main__":
    sys.exit(main())
