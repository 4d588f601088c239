"""distill_jax.runtime: host memory kept for reuse (no page faults when a large block is
freed and allocated again), asynchronous CPU dispatch off, the opt-out, and bad values.

Each case runs in a fresh interpreter: the settings are process-wide and must come
before JAX's CPU client exists."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import json, resource
    from distill_jax import runtime
    applied = runtime.configure_host()
    import jax
    # an XLA computation with a 64 MiB temporary, called repeatedly: the page faults of
    # each call after the first (which also compiles)
    f = jax.jit(lambda x: jax.numpy.sort(x[:, None] * x[None, :], axis=0)[0])
    x = jax.numpy.ones(4096)
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "xla_faults": faults[1:],
                      "async": bool(jax.config.read("jax_cpu_enable_async_dispatch"))}))
""")


def _probe(mode):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if mode is not None:
        env["DISTILL_JAX_HOST_MEMORY"] = mode
    else:
        env.pop("DISTILL_JAX_HOST_MEMORY", None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    return out


@pytest.mark.slow  # among the longest tests: kept out of the fast tier
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_is_reused_without_page_faults_and_system_mode_faults():
    kept = _probe(None)
    assert kept.returncode == 0, kept.stderr
    kept = json.loads(kept.stdout.strip().splitlines()[-1])
    assert kept["applied"] == {"keep_freed_memory": True, "sync_cpu_dispatch": True}
    assert kept["async"] is False
    # The 64 MiB temporary is 16,384 pages of 4 KiB. Kept memory is reused: calls run
    # without faults once the heap has room for the block next to whatever else was
    # allocated (a call may still grow it, so the test asks for fault-free calls, not
    # for all of them); glibc's default maps the block anew and faults on every call.
    assert sorted(kept["xla_faults"])[2] < 500, kept

    system = _probe("system")
    assert system.returncode == 0, system.stderr
    system = json.loads(system.stdout.strip().splitlines()[-1])
    assert system["applied"] == {"keep_freed_memory": False, "sync_cpu_dispatch": False}
    assert system["async"] is True
    assert min(system["xla_faults"]) > 8000, system  # the comparison above can fail


def test_unknown_mode_is_refused_by_the_cli():
    env = dict(os.environ, DISTILL_JAX_HOST_MEMORY="sometimes")
    out = subprocess.run(
        [sys.executable, "-m", "distill_jax.cli", "evaluate", "--hyp", "x", "--ref", "y"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert "DISTILL_JAX_HOST_MEMORY='sometimes'" in out.stderr
    assert "'keep' or 'system'" in out.stderr


def test_a_runs_host_memory_mode_replaces_the_default_before_jax_starts():
    """The CLI applies the environment's mode first; a run's ``runtime.host_memory`` (the
    experiment config, ``runtime.apply``) then takes over while no JAX computation has run,
    and is kept once one has (with a warning)."""
    code = textwrap.dedent("""
        from distill_jax import experiment, runtime
        runtime.configure_host()
        runtime.apply(experiment.RuntimeConfig(host_memory="system"))
        import jax
        print(runtime.applied_host_memory(), jax.config.read("jax_cpu_enable_async_dispatch"))
        jax.numpy.ones(2).block_until_ready()
        print(runtime.configure_host("keep"), runtime.applied_host_memory())
    """)
    env = {k: v for k, v in os.environ.items() if k != "DISTILL_JAX_HOST_MEMORY"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "system True",
        "{'keep_freed_memory': False, 'sync_cpu_dispatch': False} system",
    ]
    assert "host memory mode 'keep' requested after JAX's backends were initialized" in out.stderr
