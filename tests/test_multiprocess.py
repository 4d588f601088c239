"""Multi-process training on one machine, as on a TPU pod: the local launcher, the same
steps in 2 processes x 4 CPU devices as in 1 process x 8 devices and 1 x 1 device,
checkpoints across process counts, and a killed process stopping the job.

The JAX runs start ``tests/multiprocess_worker.py`` in fresh processes (``XLA_FLAGS`` is
fixed per process); the launcher tests run small shell/Python commands and are fast.
Every wait is bounded; a run that times out is killed together with its children
(the launcher's children die with it).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multiprocess_worker.py"
LAUNCH_SCRIPT = REPO / "scripts" / "launch_local.sh"
STEPS = 3
LEARNING_RATE = 1e-3  # the worker's (constant) Adam learning rate
RTOL = 1e-5
RUN_TIMEOUT_S = 900  # one JAX run (compiles on a loaded 2-core machine take minutes)
STOP_WITHIN_S = 60  # the launcher stops a job this long after one process died
# Attention key biases get an analytically zero gradient (softmax is invariant to a
# per-query constant), so their Adam updates are amplified rounding noise of size up to
# the learning rate: they are checked against that bound, not to RTOL.
NOISE_LEAVES = "['key']['bias']"


# ----------------------------------------------------------------------------- helpers


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the multi-process variables and the session's compilation
    cache (see ``run_worker``), plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DISTILL_JAX_")
        and k not in ("XLA_FLAGS", "DEVICES_PER_PROCESS", "JAX_COMPILATION_CACHE_DIR")
    }
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def launcher(num_processes: int, *command: str, grace: float = 2.0, devices: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "distill_jax.launch",
        "--local-processes",
        str(num_processes),
        "--devices-per-process",
        str(devices),
        "--grace-period",
        str(grace),
        "--",
        *command,
    ]


def start_process(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``argv`` started from the repository root in a session of its own (its process
    group can be killed as a whole), standard output and error merged into one pipe."""
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


class Job:
    """A started command whose merged output is collected line by line in a thread."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.proc = start_process(argv, env)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first output line (so far or to come) matching ``pattern``; fails after
        ``timeout`` s or when the output ends without one."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    match = re.search(pattern, line)
                    if match:
                        return match
                if self._ended:
                    pytest.fail(f"output ended without a line matching {pattern!r}:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no line matching {pattern!r} within {timeout} s:\n{self.tail()}")
                self._changed.wait(timeout=left)

    def wait(self, timeout: float) -> int:
        """The exit status; the job is killed and the test fails after ``timeout`` s."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running after {timeout} s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL to the job's process group (the launcher's copies die with it)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])


@pytest.fixture
def jobs():
    """Jobs started by a test; whatever is still running at its end is killed."""
    started: list[Job] = []

    def start(argv, env):
        started.append(Job(argv, env))
        return started[-1]

    yield start
    for job in started:
        job.kill()


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pids, timeout: float) -> list[int]:
    """The pids still alive after up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


# ----------------------------------------------------------------------------- the launcher


SHOW_ENV = (
    "import os; e = os.environ; print(e['DISTILL_JAX_PROCESS_ID'], "
    "e['DISTILL_JAX_NUM_PROCESSES'], e['DISTILL_JAX_COORDINATOR'], e['XLA_FLAGS'], "
    "e['JAX_CPU_COLLECTIVES_IMPLEMENTATION'], e['JAX_PLATFORMS'])"
)


def test_launcher_sets_environment_and_prefixes_lines(jobs):
    job = jobs(
        launcher(3, sys.executable, "-c", SHOW_ENV, devices=5),
        clean_env(
            XLA_FLAGS="--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8"
        ),
    )
    assert job.wait(60) == 0, job.tail()
    port = re.search(r"coordinator 127\.0\.0\.1:(\d+)", "\n".join(job.lines)).group(1)
    for i in range(3):
        expected = (
            f"[{i}] {i} 3 127.0.0.1:{port} --xla_cpu_enable_fast_math=false "
            f"--xla_force_host_platform_device_count=5 gloo cpu"
        )
        assert expected in job.lines, job.tail()


def test_launcher_script_passes_through_the_exit_status(jobs):
    command = [
        str(LAUNCH_SCRIPT),
        "2",
        sys.executable,
        "-c",
        "import os; print('hello'); raise SystemExit(0)",
    ]
    ok = jobs(command, clean_env(LAUNCH_PYTHON=sys.executable))
    assert ok.wait(60) == 0, ok.tail()
    assert sorted(line for line in ok.lines if line.endswith("hello")) == ["[0] hello", "[1] hello"]


def test_failed_process_stops_the_others(jobs):
    """Process 1 exits with 3; process 0 (asleep) is stopped with SIGTERM; status 3."""
    script = (
        "import os, time; print('PID', os.getpid(), flush=True)\n"
        "if os.environ['DISTILL_JAX_PROCESS_ID'] == '1': time.sleep(1); raise SystemExit(3)\n"
        "time.sleep(600)"
    )
    job = jobs(launcher(2, sys.executable, "-c", script), clean_env())
    pids = [int(job.wait_for(rf"^\[{i}\] PID (\d+)", 60).group(1)) for i in (0, 1)]
    start = time.monotonic()
    assert job.wait(STOP_WITHIN_S) == 3, job.tail()
    assert time.monotonic() - start < STOP_WITHIN_S
    assert wait_dead(pids, 5) == [], job.tail()
    assert any("process 1 exited with status 3; stopping the others" in line for line in job.lines)


def test_process_ignoring_sigterm_is_killed_after_the_grace_period(jobs):
    script = (
        "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "if os.environ['DISTILL_JAX_PROCESS_ID'] == '0': time.sleep(2); raise SystemExit(1)\n"
        "time.sleep(600)"
    )
    job = jobs(launcher(2, sys.executable, "-c", script, grace=1.0), clean_env())
    start = time.monotonic()
    assert job.wait(STOP_WITHIN_S) == 1, job.tail()
    assert time.monotonic() - start < 30
    assert any("sending SIGKILL" in line for line in job.lines), job.tail()


def test_sigint_and_sigterm_are_forwarded(jobs):
    """Each copy handles the signal itself and exits cleanly: status 0, one line each."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        script = (
            "import signal, sys, time\n"
            "def stop(signum, frame): print('stopping on', signum, flush=True); sys.exit(0)\n"
            f"signal.signal({int(signum)}, stop); print('ready', flush=True); time.sleep(600)"
        )
        job = jobs(launcher(2, sys.executable, "-c", script), clean_env())
        for i in (0, 1):
            job.wait_for(rf"^\[{i}\] ready$", 60)
        job.proc.send_signal(signum)
        assert job.wait(STOP_WITHIN_S) == 0, job.tail()
        for i in (0, 1):
            assert f"[{i}] stopping on {int(signum)}" in job.lines, job.tail()


def test_children_die_with_the_launcher(jobs):
    """A launcher killed outright (no chance to clean up) takes its copies along."""
    script = "import os, time; print('PID', os.getpid(), flush=True); time.sleep(600)"
    job = jobs(launcher(2, sys.executable, "-c", script), clean_env())
    pids = [int(job.wait_for(rf"^\[{i}\] PID (\d+)", 60).group(1)) for i in (0, 1)]
    assert all(alive(p) for p in pids)
    job.proc.kill()  # the launcher only, not its process group
    job.wait(30)
    assert wait_dead(pids, 10) == []


# ----------------------------------------------------------------------------- JAX runs


def run_worker(out: Path, args: list[str], *, processes: int, devices: int) -> None:
    """Runs the worker in ``processes`` processes of ``devices`` CPU devices each.

    No persistent compilation cache: a process that finds a program in it while its peer
    compiles reaches the first collective long before the peer, and gloo gives up after
    30 s.
    """
    worker = [sys.executable, str(WORKER), "--out", str(out), "--steps", str(STEPS), *args]
    env = clean_env()
    if processes == 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        argv = worker
    else:
        env.update(LAUNCH_PYTHON=sys.executable, DEVICES_PER_PROCESS=str(devices))
        argv = [str(LAUNCH_SCRIPT), str(processes), *worker]
    proc = start_process(argv, env)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=30)
        pytest.fail(f"{' '.join(argv)} ran longer than {RUN_TIMEOUT_S} s:\n{output[-6000:]}")
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{output[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same training in three layouts, with checkpoints handed between them:

    one8  1 process x 8 devices: meshes (2,2,2) (checkpoint at step 2) and (8,1,1)
    two   2 processes x 4 devices: the same, and restores one8's checkpoint on (8,1,1)
    one1  1 process x 1 device: mesh (1,1,1), and restores two's checkpoint on it
    """
    root = tmp_path_factory.mktemp("multiprocess")
    timings = {}
    start = time.monotonic()
    # one8 and two: meshes (2,2,2) then (8,1,1), saving at step 2
    both_meshes = ["--train", "2,2,2", "--train", "8,1,1", "--save-at", "2"]
    run_worker(
        root / "one8",
        [*both_meshes, "--save-dir", str(root / "ckpt_one8")],
        processes=1,
        devices=8,
    )
    timings["one8"] = time.monotonic() - start
    start = time.monotonic()
    run_worker(
        root / "two",
        [
            *both_meshes,
            "--save-dir",
            str(root / "ckpt_two"),
            "--restore-from",
            str(root / "ckpt_one8"),
            "--restore-mesh",
            "8,1,1",
        ],
        processes=2,
        devices=4,
    )
    timings["two"] = time.monotonic() - start
    start = time.monotonic()
    run_worker(
        root / "one1",
        ["--train", "1,1,1", "--restore-from", str(root / "ckpt_two"), "--restore-mesh", "1,1,1"],
        processes=1,
        devices=1,
    )
    timings["one1"] = time.monotonic() - start
    print("run seconds:", {k: round(v, 1) for k, v in timings.items()})
    return {name: root / name for name in ("one8", "two", "one1")}


def load(path: Path) -> dict[str, np.ndarray]:
    assert path.is_file(), f"{path} was not written"
    with np.load(path) as data:
        return dict(data)


def params_of(results: dict, prefix: str = "param") -> dict[str, np.ndarray]:
    return {k[len(prefix) - len("param") :]: v for k, v in results.items() if k.startswith(prefix)}


def assert_params_close(actual: dict, expected: dict, rtol: float = RTOL) -> None:
    """Relative difference of the whole parameter vector <= rtol (noise leaves aside,
    see NOISE_LEAVES), and every leaf close to its own scale."""
    assert sorted(actual) == sorted(expected) and expected
    strict = [k for k in expected if NOISE_LEAVES not in k]
    diff = math.sqrt(sum(float(np.sum((actual[k] - expected[k]) ** 2)) for k in strict))
    norm = math.sqrt(sum(float(np.sum(expected[k] ** 2)) for k in strict))
    assert diff <= rtol * norm, f"relative parameter difference {diff / norm:.3g} > {rtol}"
    for key in strict:
        np.testing.assert_allclose(
            actual[key], expected[key], rtol=10 * rtol, atol=1e-6, err_msg=key
        )
    for key in set(expected) - set(strict):
        np.testing.assert_allclose(
            actual[key], expected[key], rtol=0, atol=2 * STEPS * LEARNING_RATE, err_msg=key
        )


def assert_same_training(actual: dict, expected: dict) -> None:
    """Same global batches, losses, gradient norms and final parameters."""
    np.testing.assert_array_equal(actual["indices"], expected["indices"])
    np.testing.assert_array_equal(actual["tokens"], expected["tokens"])
    np.testing.assert_allclose(actual["loss_sum"], expected["loss_sum"], rtol=RTOL)
    np.testing.assert_allclose(actual["grad_norm"], expected["grad_norm"], rtol=RTOL)
    assert int(actual["step"]) == int(expected["step"])
    assert_params_close(params_of(actual), params_of(expected))


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["2x2x2", "8x1x1"])
def test_two_processes_match_one_process(runs, mesh):
    assert_same_training(
        load(runs["two"] / f"train_{mesh}.npz"), load(runs["one8"] / f"train_{mesh}.npz")
    )


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["2x2x2", "8x1x1"])
def test_two_processes_match_one_device(runs, mesh):
    reference = load(runs["one1"] / "train_1x1x1.npz")
    results = load(runs["two"] / f"train_{mesh}.npz")
    assert_same_training(results, reference)
    # The comparison means something: the batches hold several records and empty filler
    # rows, every step changes the loss, and training moves the parameters far beyond the
    # tolerance between step 2 and step 3.
    assert results["indices"].shape == (STEPS, 16)
    assert (results["indices"] == -1).any() and len(set(results["loss_sum"])) == STEPS
    if mesh == "2x2x2":
        moved, step2 = params_of(results), params_of(results, "saved_param")
        change = math.sqrt(sum(float(np.sum((moved[k] - step2[k]) ** 2)) for k in moved))
        norm = math.sqrt(sum(float(np.sum(v**2)) for v in moved.values()))
        assert change > 100 * RTOL * norm


@pytest.mark.slow
def test_every_process_sees_the_same_metrics(runs):
    views = [json.loads((runs["two"] / f"done_{i}.json").read_text()) for i in (0, 1)]
    assert views[0] == views[1] and set(views[0]) == {"train_2x2x2", "train_8x1x1", "restore_8x1x1"}


def check_restore(restored: dict, saver: dict) -> None:
    """``restored`` (a restore at step 2, then one step) against the run that saved."""
    assert int(restored["restored_step"]) == 2
    saved = params_of(saver, "saved_param")
    for key, value in params_of(restored, "restored_param").items():
        np.testing.assert_array_equal(value, saved[key], err_msg=key)
    assert json.loads(str(restored["restored_data_state"])) == json.loads(
        str(saver["saved_data_state"])
    )
    # the step after the restore reads the batch and computes the update the saver did
    np.testing.assert_array_equal(restored["indices"], saver["indices"][2:])
    np.testing.assert_allclose(restored["loss_sum"], saver["loss_sum"][2:], rtol=RTOL)
    np.testing.assert_allclose(restored["grad_norm"], saver["grad_norm"][2:], rtol=RTOL)
    assert_params_close(params_of(restored), params_of(saver))


@pytest.mark.slow
def test_checkpoint_of_two_processes_restores_in_one(runs):
    check_restore(load(runs["one1"] / "restore_1x1x1.npz"), load(runs["two"] / "train_2x2x2.npz"))


@pytest.mark.slow
def test_checkpoint_of_one_process_restores_in_two(runs):
    check_restore(load(runs["two"] / "restore_8x1x1.npz"), load(runs["one8"] / "train_2x2x2.npz"))


@pytest.mark.slow
def test_killed_process_stops_the_job(jobs, tmp_path):
    """SIGKILL to process 1 while both train: the launcher stops process 0 (blocked in a
    collective with the dead peer) and exits non-zero within STOP_WITHIN_S. (One device
    per process: the mesh does not matter here, and it compiles faster.)"""
    env = clean_env(LAUNCH_PYTHON=sys.executable, DEVICES_PER_PROCESS="1")
    job = jobs(
        [
            str(LAUNCH_SCRIPT),
            "2",
            sys.executable,
            str(WORKER),
            "--out",
            str(tmp_path),
            "--train",
            "2,1,1",
            "--steps",
            "100000",
            "--print-steps",
        ],
        env,
    )
    pids = {}
    for i in (0, 1):
        pids[i] = int(job.wait_for(rf"^\[{i}\] process {i}/2: .* PID (\d+)", 300).group(1))
    job.wait_for(r"^\[1\] STEP 2$", RUN_TIMEOUT_S)
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    status = job.wait(STOP_WITHIN_S + 30)
    elapsed = time.monotonic() - killed_at
    print(f"the job stopped {elapsed:.1f} s after process 1 was killed")
    assert elapsed < STOP_WITHIN_S, job.tail()
    assert status != 0
    assert wait_dead(list(pids.values()), 5) == [], job.tail()
    # The launcher names the kill, unless process 0 saw its peer's socket close and exited
    # first (a race): then its summary still shows process 1's SIGKILL status, 128 + 9.
    assert any(
        "process 1 was killed by signal 9" in line
        or ("exit statuses:" in line and line.rstrip().endswith(", 137]"))
        for line in job.lines
    ), job.tail()
