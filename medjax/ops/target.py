"""Choose code by the platform a computation is compiled FOR, not the host's default backend.

A train step jitted with shardings on TPU devices must use the Mosaic kernels even when it is
traced on a CPU host (compile-only devices, ``python -m medjax.plan --compile``); one compiled
for an H100 must use Triton / cuDNN. ``jax.default_backend()`` names the host, so it cannot
decide. :func:`on_target` stages out one branch per platform with ``jax.lax.platform_dependent``:
XLA keeps the branch of the platform it lowers for and drops the others before compiling.

Every branch is traced, so only platforms this jax can compile for get one (the others would
cost tracing time and can never be selected): ``cpu`` always; ``tpu`` when libtpu is installed;
``cuda`` when the jax CUDA plugin is; ``rocm`` when the ROCm plugin is. :func:`target_platforms`
overrides the set (tests lower for platforms whose plugin is absent).

Custom-call kernels (Mosaic, Triton) cannot be partitioned by GSPMD. :func:`per_shard` runs
one on each device's shard with ``jax.shard_map`` over the context mesh (``jax.set_mesh``):
rows split over every mesh axis but ``tensor``, heads over ``tensor`` (medjax's mesh axes,
``medjax.sharding.MESH_AXES``). :func:`context_mesh` is the one lookup of that mesh (the MoE's
expert-parallel dispatch uses it too).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import math
from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
_OVERRIDE: list[tuple[str, ...] | None] = [None]


def _has_module(*names: str) -> bool:
    for name in names:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


@functools.lru_cache(maxsize=1)
def installed_platforms() -> tuple[str, ...]:
    """The platforms this installation can compile for (plugins present), host's first."""
    found = ["cpu"]
    if _has_module("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
                   "jax_plugins.xla_cuda13"):
        found.append("cuda")
    if _has_module("jax_rocm60_plugin", "jax_rocm7_plugin", "jax_plugins.xla_rocm60",
                   "jax_plugins.xla_rocm7"):
        found.append("rocm")
    if _has_module("libtpu"):
        found.append("tpu")
    return tuple(found)


def compilable_platforms() -> tuple[str, ...]:
    return _OVERRIDE[0] or installed_platforms()


@contextlib.contextmanager
def target_platforms(*platforms: str):
    """Trace branches for exactly these platforms (e.g. to lower for TPU without libtpu)."""
    unknown = set(platforms) - set(PLATFORMS)
    if unknown or not platforms:
        raise ValueError(f"target_platforms: unknown {sorted(unknown)}; choose from {PLATFORMS}")
    old, _OVERRIDE[0] = _OVERRIDE[0], tuple(platforms)
    try:
        yield
    finally:
        _OVERRIDE[0] = old


def host_platform() -> str:
    """The platform eager (un-jitted) calls run on: 'cpu' | 'cuda' | 'rocm' | 'tpu'."""
    backend = jax.default_backend()
    if backend == "gpu":
        version = jax.devices()[0].client.platform_version.lower()
        return "rocm" if "rocm" in version else "cuda"
    return backend


# XLA:CPU has no bf16 dot: it converts each bf16 operand to f32, and its while-loop-invariant
# code motion hoists that convert of a scanned layer stack out of the loop, so a step over bf16
# weights holds an f32 copy of every layer (2x the weights: 25 GiB for Llama-2-7B). Without the
# pass each layer is converted inside the loop, one at a time (tests/ops/test_compiler_options.py).
_OPTIONS = {"cpu": {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}}


def compiler_options(where) -> dict | None:
    """The XLA options for ``jax.jit(..., compiler_options=)`` of a model's computation, for the
    platform of ``where``: a ``Mesh``, a device, or a pytree of arrays (their first leaf's
    devices). ``None`` (XLA's defaults) on GPU/TPU and for an abstract mesh."""
    if isinstance(where, jax.sharding.Mesh):
        device = where.devices.flat[0]
    elif isinstance(where, jax.Device):
        device = where
    else:
        leaf = next((x for x in jax.tree.leaves(where) if isinstance(x, jax.Array)), None)
        if leaf is None:
            return None
        device = next(iter(leaf.devices()))
    return _OPTIONS.get(device.platform)


def settle(tree):
    """``tree`` once every array in it is computed on all its devices (``jax.block_until_ready``).

    Call it before handing arrays that a program may still be computing to SEVERAL programs with
    collectives (a checkpoint's reorder, held-out eval batches, an export's merges). XLA:CPU runs
    every device's part of every program on one pool with a thread per device, and a part is
    queued when its inputs on its own device are ready: two such programs waiting on one program
    in flight get their parts queued device by device, interleaved, fill the pool with parts that
    wait at a collective for peers that cannot get a thread, and XLA aborts the process after
    ``xla_cpu_collective_call_terminate_timeout_seconds`` (40). Seen under load with 8 simulated
    devices (the circular pipeline's per-leaf checkpoint reorder, docs/SCALE.md); ready inputs
    queue each program whole. On GPU and TPU, where each device runs its programs in order, it
    only waits for the program in flight."""
    return jax.block_until_ready(tree)


def on_target(branch: Callable[[str], object]):
    """``branch(platform)`` staged for every compilable platform; the compiler's target picks.

    ``branch`` takes the platform name and returns the result (closing over its arrays). With a
    single compilable platform it is called directly (no conditional in the program).
    """
    platforms = compilable_platforms()
    if len(platforms) == 1:
        return branch(platforms[0])
    per_platform = {p: functools.partial(branch, p) for p in platforms}
    return jax.lax.platform_dependent(**per_platform, default=per_platform[platforms[0]])


HEAD_AXIS = "tensor"        # the mesh axis attention heads are split over (tensor parallelism)
EXPERT_AXIS = "expert"      # the mesh axis MoE experts are split over (expert parallelism)
BATCH_AXES = ("data", "fsdp", EXPERT_AXIS)   # the mesh axes a global batch's rows are split over


_LOGICAL_RULES: contextvars.ContextVar = contextvars.ContextVar("medjax_logical_rules", default=None)


@contextlib.contextmanager
def logical_rules(table):
    """Within: the context mesh's sharding rules, logical axis name → mesh axes
    (``medjax.sharding.ShardingRules.table``; set with the mesh by ``train.step.on_mesh``)."""
    token = _LOGICAL_RULES.set(table)
    try:
        yield
    finally:
        _LOGICAL_RULES.reset(token)


def mesh_axes_of(logical: str) -> tuple:
    """The mesh axes the context's rules split logical axis ``logical`` over (``()``: whole)."""
    table = _LOGICAL_RULES.get()
    if table is None:
        raise ValueError("no sharding rules in context: trace under medjax.train.step.on_mesh")
    entry = table.get(logical)
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def row_axes(mesh) -> tuple:
    """The axes of ``mesh`` (size > 1) that split the batch's rows (:data:`BATCH_AXES`)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def row_shards(mesh) -> int:
    """How many ways :func:`row_axes` split the rows (1 on a mesh without them)."""
    return math.prod(mesh.shape[a] for a in row_axes(mesh))


def constrain_rows(x_B):
    """``x_B`` (``[B, ...]``: the residual stream) pinned to rows split over the context mesh's
    batch axes, every other dimension whole; unchanged without a multi-device mesh or when the
    rows do not split evenly. Without it GSPMD lets the embedding table's fsdp-split ``embed``
    dimension flow into the activations: every projection then ran on the whole batch with its
    contraction split, plus all-to-alls into and out of the attention kernel and partial sums to
    reduce (Llama-2-7B on v5p-8: 1.34x EasyDeL's optimal_seconds, docs/PERFORMANCE.md)."""
    mesh = context_mesh()
    if mesh is None:
        return x_B
    rows = row_axes(mesh)
    if not rows or x_B.shape[0] % row_shards(mesh):
        return x_B
    return jax.lax.with_sharding_constraint(x_B, P(rows, *(None,) * (x_B.ndim - 1)))


def context_mesh():
    """The multi-device context mesh (``jax.set_mesh`` / ``training.step.on_mesh``), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def per_shard(fn, rows_first: dict, heads_third: dict):
    """``fn(**rows_first, **heads_third)`` on each device's shard of the context mesh.

    ``rows_first``: arrays ``[B, ...]`` split by rows; ``heads_third``: ``[B, T, H, D]`` split by
    rows and heads (output laid out like the first of them). Without a multi-device context
    mesh, ``fn`` is called as is."""
    mesh = context_mesh()
    if mesh is None:
        return fn(**rows_first, **heads_third)
    B = next(iter(heads_third.values())).shape[0]
    rows, n_rows = row_axes(mesh), row_shards(mesh)
    if B % n_rows:
        raise ValueError(f"attention kernel: {B} rows per call cannot split over mesh axes "
                         f"{rows} ({n_rows} devices); make the micro-batch a multiple of it")
    heads = HEAD_AXIS if mesh.shape.get(HEAD_AXIS, 1) > 1 else None
    for name, x in heads_third.items():
        if heads and x.shape[2] % mesh.shape[HEAD_AXIS]:
            raise ValueError(f"attention kernel: {name} has {x.shape[2]} heads, not divisible by "
                             f"mesh axis {HEAD_AXIS}={mesh.shape[HEAD_AXIS]}")
    row_spec = rows or None
    in_specs = ({k: P(row_spec) for k in rows_first},
                {k: P(row_spec, None, heads, None) for k in heads_third})
    body = lambda r, h: fn(**r, **h)  # noqa: E731
    return jax.shard_map(body, in_specs=in_specs, out_specs=P(row_spec, None, heads, None),
                         check_vma=False)(rows_first, heads_third)
