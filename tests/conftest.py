"""Test setup: CPU with 8 fake devices, set before jax is imported anywhere; one
persistent compilation cache for the session (in this process and the programs the tests
launch, which inherit the environment: the same tiny programs compile once, not once a
test); the runs that several test modules compare against, made once per session."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="audiodiff-jax-test-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


@pytest.fixture(scope="session")
def resume_shards(tmp_path_factory):
    """The shards of the resume and dead-host tests (tests/test_resume.py)."""
    from tests.helpers import write_shards

    return write_shards(str(tmp_path_factory.mktemp("resume_shards")))


@pytest.fixture(scope="session")
def two_full(resume_shards, tmp_path_factory):
    """An uninterrupted run of two processes x 4 devices on localhost, the reference of
    the two-process resume (tests/test_resume.py) and of the dead host's restart
    (tests/test_failures.py)."""
    from tests.test_resume import launch_two

    tmp = tmp_path_factory.mktemp("two")
    full = str(tmp / "full")
    p = launch_two(resume_shards, full, tmp / "logs_full")
    assert p.wait(timeout=600) == 0, open(tmp / "logs_full" / "process_1.log").read()[-3000:]
    return full
