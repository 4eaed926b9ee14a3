"""The pytest session runs on 8 forced CPU devices, so multi-device checks run in-process.

``jax_num_cpu_devices`` must be set before jax creates its CPU backend, so it is set here, at
import. A test sees all 8 devices only when marked ``multidevice``; every other test gets a
1-device ``medjax.sharding.make_mesh`` (the ``mesh_devices`` fixture), so that the meaning and the
cost of the single-device tests do not change. Subprocesses are left for what needs them: several
processes, kills, signals, and the libtpu / CUDA venvs.
"""
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import jax
import pytest

SESSION_DEVICES = 8
jax.config.update("jax_num_cpu_devices", SESSION_DEVICES)

# One persistent compilation cache per test run, shared by the xdist workers and every subprocess
# they start (the env vars): `python -m medjax.train` in forty tests compiles the same tiny steps,
# about half of a tiny run's time. Every program is cached (tiny ones compile in under the default
# 1 s threshold). Per run, not per machine, so that a run's timing never depends on an earlier one;
# the run that made the directory removes it (``pytest_unconfigure``).
_CACHE_OWNER = "MEDJAX_TEST_JAX_CACHE_OWNER"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="medjax-test-jax-cache-")
    os.environ[_CACHE_OWNER] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


# XLA:CPU's backend (LLVM) at -O0 for the whole run, in-process and in every subprocess (they
# inherit XLA_FLAGS; the ones that set a device count append to it): most of a test's time is
# compiling tiny programs, not running them (a 3-step tiny train: 9.7 s -> 7.9 s, same losses).
# Before jax creates its CPU backend (at the first computation), like jax_num_cpu_devices.
_O0 = "--xla_backend_optimization_level=0"
if _O0 not in os.environ.get("XLA_FLAGS", ""):      # xdist workers inherit the controller's
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_O0}".strip()


def pytest_unconfigure(config):
    if os.environ.get(_CACHE_OWNER) == str(os.getpid()):
        import shutil
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
BENCHMARKS = ROOT.parent / "shared" / "data" / "benchmarks"


def pytest_collection_modifyitems(config, items):
    import shutil
    has_gpu = shutil.which("nvidia-smi") is not None
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


class MeshDevices:
    """How many of the session's devices ``make_mesh`` lays out when not given devices."""

    def __init__(self, count: int):
        self.count = count

    @contextlib.contextmanager
    def use(self, count: int):
        before, self.count = self.count, count
        try:
            yield jax.devices()[:count]
        finally:
            self.count = before


_MESH_DEVICES = MeshDevices(1)


@pytest.fixture(scope="session", autouse=True)
def _one_device_make_mesh():
    """Patched for the whole session, so module- and session-scoped fixtures (which pytest sets
    up before any function-scoped one) also get the 1-device mesh."""
    from medjax import sharding
    make_mesh = sharding.make_mesh

    def on_session_devices(mesh_cfg, devices=None):
        return make_mesh(mesh_cfg, jax.devices()[:_MESH_DEVICES.count] if devices is None else devices)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sharding, "make_mesh", on_session_devices)
        yield


@pytest.fixture(autouse=True)
def mesh_devices(request):
    """``make_mesh`` over 1 device, or all 8 for tests marked ``multidevice``."""
    count = SESSION_DEVICES if request.node.get_closest_marker("multidevice") else 1
    with _MESH_DEVICES.use(count):
        yield _MESH_DEVICES


@pytest.fixture(scope="session")
def benchmarks_dir():
    if not BENCHMARKS.is_dir():
        pytest.skip(f"benchmark data not found at {BENCHMARKS}")
    return BENCHMARKS
