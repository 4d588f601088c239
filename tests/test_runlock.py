"""One writer per run directory (issue #34 item 3): a second run on a locked run directory
stops with exit 2 naming the holder; the lock of a killed run is recovered by itself; on
gs:// a lease object written under generation preconditions does the same."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distill_jax import cli, runlock
from distill_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/tiny.py"

HOLDER = textwrap.dedent("""
    import sys, time
    from distill_jax import runlock
    runlock.acquire(sys.argv[1], "holder-command", *sys.argv[2:])
    print("held", flush=True)
    time.sleep(600)
""")


def _hold(directory, *name):
    """A process that holds the lock of ``directory`` until it is killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), *name],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert process.stdout.readline().strip() == "held"
    return process


def _kill(process):
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_local_lock_refuses_a_second_writer_and_recovers_from_kill_9(tmp_path):
    run = tmp_path / "students" / "distilled"
    holder = _hold(run)
    try:
        with pytest.raises(UserError) as info:
            runlock.acquire(run, "second")
        message = str(info.value)
        assert f"{run} is in use by `holder-command` (pid {holder.pid} on host " in message
        assert "started 20" in message  # the holder's start time
    finally:
        _kill(holder)
    # The kernel released the killed holder's lock: the next run takes it at once.
    runlock.acquire(run, "third")  # held until release_all()
    try:
        record = json.loads((run / ".lock").read_text())
        assert record["pid"] == os.getpid() and record["command"] == "third"
        with pytest.raises(UserError, match="is in use by `third`"):
            runlock.FileLock(run, "fourth")  # (a second open file description: refused too)
    finally:
        runlock.release_all()
    assert (run / ".lock").read_text() == ""  # released: no holder recorded
    runlock.acquire(run, "fifth")
    runlock.release_all()


@pytest.mark.parametrize(
    "command,where",
    [
        ("train-teacher", ("teacher",)),
        ("train-student", ("students", "distilled")),
        ("soft-targets", ("soft_targets", ".train.lock")),
    ],
)
def test_commands_refuse_a_locked_run_directory(tmp_path, capsys, command, where):
    """Each writing command takes its run directory's lock before anything else: a
    second run exits 2 naming the holder and writes nothing (no config.json)."""
    workdir = tmp_path / "work"
    name = where[-1:] if where[-1].endswith(".lock") else ()
    directory = workdir.joinpath(*(where[:-1] if name else where))
    holder = _hold(directory, *name)
    try:
        status = cli.main([command, "--config", CONFIG, "--workdir", str(workdir), "--no-progress"])
        err = capsys.readouterr().err
    finally:
        _kill(holder)
    assert status == 2
    assert f"is in use by `holder-command` (pid {holder.pid}" in err, err
    assert sorted(p.name for p in directory.iterdir()) == [name[0] if name else ".lock"]


def test_multi_process_run_locks_once_and_stops_together(tmp_path):
    """Two processes of one job share a run directory: process 0 takes the lock, nobody
    deadlocks; when another run holds it, both processes stop with exit 2."""
    from test_multiprocess import clean_env, launcher

    script = textwrap.dedent("""
        import argparse, sys
        from distill_jax import runlock
        from distill_jax.commands import common
        args = argparse.Namespace(coordinator=None, num_processes=None, process_id=None)
        import os
        args.coordinator = os.environ["DISTILL_JAX_COORDINATOR"]
        args.num_processes = int(os.environ["DISTILL_JAX_NUM_PROCESSES"])
        args.process_id = int(os.environ["DISTILL_JAX_PROCESS_ID"])
        common.initialize_processes(args)
        from distill_jax.errors import UserError
        # Each process reports through its own file: the CPU collectives' threads print to
        # the same stdout while this runs, and their words can land inside a printed line.
        outcome = open(f"{sys.argv[2]}-{args.process_id}", "w")
        try:
            lock = runlock.acquire(sys.argv[1], "job")
        except UserError as err:
            outcome.write(f"refused: {err}")
            outcome.close()
            sys.exit(2)
        outcome.write("got " + ("lock" if lock is not None else "no lock (not process 0)"))
        outcome.close()
        runlock.release_all()
    """)
    run = tmp_path / "run"
    report = tmp_path / "outcome"

    def outcomes() -> list[str]:
        return [Path(f"{report}-{i}").read_text() for i in range(2)]

    def two_processes() -> subprocess.CompletedProcess:
        for i in range(2):
            Path(f"{report}-{i}").unlink(missing_ok=True)
        return subprocess.run(
            launcher(2, sys.executable, "-c", script, str(run), str(report)),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env=clean_env(),
        )

    job = two_processes()
    assert job.returncode == 0, job.stdout + job.stderr
    assert outcomes() == ["got lock", "got no lock (not process 0)"]

    holder = _hold(run)
    try:
        job = two_processes()
    finally:
        _kill(holder)
    assert job.returncode == 2, job.stdout + job.stderr
    chief, other = outcomes()
    assert chief.startswith(f"refused: {run} is in use by `holder-command` (pid {holder.pid}"), (
        chief
    )
    assert other.startswith(f"refused: process 0 could not lock the run directory {run}"), other


# ----------------------------------------------------------------------------- gs://


def test_gcs_lease_refuses_a_second_writer_and_is_taken_over_once_stale(gcs):
    run = gcs.gs("work", "students", "distilled")
    first = runlock.Lease(run, "first", ttl_s=30)
    try:
        with pytest.raises(UserError) as info:
            runlock.Lease(run, "second", ttl_s=30)
        assert f"{run} is in use by `first` (pid {os.getpid()}" in str(info.value)
        assert "renewed 0 s ago" in str(info.value) or "renewed 1 s ago" in str(info.value)
    finally:
        first.release()
    # Released: the next run takes it.
    second = runlock.Lease(run, "second", ttl_s=2)
    # A holder that stops renewing (a killed process: here its renewal thread is stopped
    # without releasing) loses the lease once it is older than its ttl.
    second._stop.set()
    second._thread.join()
    with pytest.raises(UserError, match="is in use by `second`"):
        runlock.Lease(run, "third", ttl_s=30)
    time.sleep(3.5)
    third = runlock.Lease(run, "third", ttl_s=30)
    try:
        # The old holder's next renewal fails its generation precondition: it learns it
        # lost the lease (and train_loop's runlock.check_held stops it before a save).
        with pytest.raises(runlock._PreconditionFailed):
            second._write(second.generation)
        runlock._HELD.append(second)
        second._lost = "the lease was taken over"
        with pytest.raises(UserError, match="taken over"):
            runlock.check_held()
    finally:
        runlock._HELD.clear()
        third.release()
    again = runlock.Lease(run, "fourth", ttl_s=30)  # released: free again
    again.release()


def test_gcs_lease_renewal_keeps_a_live_holder(gcs):
    run = gcs.gs("work", "teacher")
    holder = runlock.Lease(run, "holder", ttl_s=1.2)
    try:
        time.sleep(2.5)  # longer than the ttl: only the renewals keep it
        assert holder.lost() is None
        with pytest.raises(UserError, match="is in use by `holder`"):
            runlock.Lease(run, "second", ttl_s=30)
    finally:
        holder.release()


def test_gcs_lease_of_an_ended_process_on_this_host_is_taken_over_at_once(gcs):
    """A rerun after kill -9 on the same machine does not wait for the lease to expire."""
    run = gcs.gs("work", "soft_targets")
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    holder = runlock.Lease(run, "killed", ttl_s=600)
    holder._stop.set()
    holder._thread.join()
    holder.record["pid"] = int(ended.stdout)  # its record now names a process that ended
    holder.generation = holder._write(holder.generation)
    again = runlock.Lease(run, "rerun", ttl_s=600)
    again.release()
    # A live holder on this host (this very process) is not taken over.
    live = runlock.Lease(run, "live", ttl_s=600)
    try:
        with pytest.raises(UserError, match="is in use by `live`"):
            runlock.Lease(run, "second", ttl_s=600)
    finally:
        live.release()
