"""scripts/provenance.py: the machine and commit every record in results/ names."""

import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import provenance  # noqa: E402


def test_git_commit_names_this_checkout():
    head = subprocess.run(
        ["git", "-C", provenance.REPO, "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
    )
    if head.returncode != 0:
        assert provenance.git_commit() == "unknown"
        return
    commit = provenance.git_commit()
    assert re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", commit), commit
    assert commit.split("+")[0] == head.stdout.strip()


def test_git_commit_outside_a_checkout_is_unknown(tmp_path):
    assert provenance.git_commit(str(tmp_path)) == "unknown"


def test_cpu_model_is_a_name():
    model = provenance.cpu_model()
    assert isinstance(model, str) and model.strip() == model and model


def test_cpu_description_tells_apart_two_cpus_of_one_product_line():
    """Virtual machines report "AMD EPYC" for CPUs that differ in vector width (and so in
    XLA's results and speed); the record names family, model and the widest extension."""
    zen3 = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
        "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
        "processor\t: 1\ncpu family\t: 99\nmodel\t\t: 9\nmodel name\t: other\n"
        "flags\t\t: avx512f\n"
    )
    zen4 = zen3.replace("model\t\t: 1\n", "model\t\t: 17\n", 1).replace(
        "avx2 fma", "avx2 fma avx512f", 1
    )
    assert provenance.describe_cpu(zen3) == "AMD EPYC (family 25 model 1, AVX2)"
    assert provenance.describe_cpu(zen4) == "AMD EPYC (family 25 model 17, AVX-512)"
    bare = "model name\t: Some CPU\n"
    assert provenance.describe_cpu(bare) == "Some CPU"


def test_runs_record_the_code_they_were_made_with():
    """results.json's ``code`` (distill_jax.runner.code_version): the package version and the
    commit of the checkout the package is imported from, as scripts/provenance.py names it."""
    import distill_jax
    from distill_jax import runner

    code = runner.code_version()
    assert code["version"] == distill_jax.__version__
    expected = provenance.git_commit()
    assert code["commit"] == (None if expected == "unknown" else expected)
