"""Device meshes and the ONE object that maps logical axis names to mesh axes.

Every weight says what its dimensions mean where it is defined
(``nnx.Param(w, logical_axes=("embed", "mlp"))``); activations use ``batch`` and ``seq``.
A :class:`ShardingRules` maps each logical name to zero or more of the four mesh axes
``stage, data, fsdp, tensor, expert``. Four presets cover the usual layouts:

=========  ==========================================================================
dp         params replicated; batch split over ``data`` (× fsdp × expert, size 1 here)
fsdp       ``embed`` split over ``fsdp`` (ZeRO-3: each device holds 1/N of every matrix;
           XLA all-gathers a layer's weights before use and reduce-scatters its grads)
fsdp_tp    fsdp + Megatron tensor parallel: ``q_heads, kv_heads, mlp, vocab`` over ``tensor``
fsdp_ep    fsdp + expert parallel: ``experts`` over ``expert``; the expert axis also splits
           the batch, so dense layers stay data parallel on it
=========  ==========================================================================

``data`` is allowed in every preset (hybrid/HSDP: replicas of an fsdp group, e.g. one per
TPU slice). An axis a preset does not use must have size 1 (ConfigError otherwise).

``stage`` (``mesh.stage``, pipeline parallelism, medjax/models/pipeline.py) combines with every
preset: it is the outermost axis (the slowest links: between nodes or slices), the rules of a
mesh with ``stage > 1`` (:func:`rules_of`) split the stacked ``layers`` axis over it, and the
preset's own rules apply inside each stage.

Decisions (documented in docs/SCALE.md):
- Mesh axes are ``AxisType.Auto``: arrays carry ``NamedSharding``s and GSPMD propagates them
  through ``jax.jit``; train steps pin ``in_shardings``/``out_shardings``.
- A dimension not divisible by the product of its mesh axes is an error naming the array —
  never a silent fallback to replicated. Same for an unknown logical name, for two logical
  axes of one array mapping to the same mesh axis, and for heads/experts that do not divide
  the tensor/expert axis (:func:`check_model`). All of these raise before any compilation.
- Axes of size 1 are kept in the specs (harmless) so one rules object serves every mesh size.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from medjax.errors import ConfigError
from medjax.ops.target import BATCH_AXES   # the mesh axes a global batch is split over

MESH_AXES = ("stage", "data", "fsdp", "tensor", "expert")
PIPELINE_AXIS = "stage"     # pipeline stages; allowed with every preset (not in PRESET_AXES)
# The mesh presets, the one table of them (medjax.config validates mesh.* against it): the mesh
# axes a preset may give size > 1, the first being the one that takes "the rest" of the devices
# when the config leaves sizes unset.
PRESET_AXES = {"dp": ("data",), "fsdp": ("fsdp", "data"), "fsdp_tp": ("fsdp", "data", "tensor"),
               "fsdp_ep": ("fsdp", "data", "expert")}
PRESETS = tuple(PRESET_AXES)
_REST_AXIS = {preset: axes[0] for preset, axes in PRESET_AXES.items()}




MeshAxes = Optional[tuple]  # None (replicated) or a tuple of mesh axis names


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name → mesh axes. The only place layouts are decided."""

    name: str
    table: Mapping[str, MeshAxes]

    def mesh_axes(self, logical: Optional[str], *, where: str = "array") -> MeshAxes:
        if logical is None:
            return None
        if logical not in self.table:
            raise ConfigError(f"{where}: logical axis {logical!r} has no rule in preset "
                                f"{self.name!r} (known: {sorted(self.table)})")
        return self.table[logical]

    def spec(self, logical_axes: Sequence[Optional[str]], *, where: str = "array") -> PartitionSpec:
        """PartitionSpec for an array whose dims are named ``logical_axes``.

        Raises if two dims would be split over the same mesh axis.
        """
        entries, used = [], {}
        for logical in logical_axes:
            axes = self.mesh_axes(logical, where=where)
            for axis in axes or ():
                if axis in used:
                    raise ConfigError(
                        f"{where}: logical axes {used[axis]!r} and {logical!r} both map to mesh "
                        f"axis {axis!r} under preset {self.name!r}")
                used[axis] = logical
            entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
        return PartitionSpec(*entries)

    def sharding(self, mesh: Mesh, logical_axes, shape=None, *, where: str = "array") -> NamedSharding:
        """NamedSharding for ``logical_axes``; with ``shape``, checks every dim divides evenly."""
        if shape is not None and len(shape) != len(logical_axes):
            raise ConfigError(f"{where}: shape {tuple(shape)} has {len(shape)} dims but "
                                f"logical_axes {tuple(logical_axes)} has {len(logical_axes)}")
        spec = self.spec(logical_axes, where=where)
        if shape is not None:
            for dim, (size, entry) in enumerate(zip(shape, spec)):
                parts = _num_shards(mesh.shape, entry)
                if size % parts:
                    raise ConfigError(
                        f"{where}: dim {dim} ({logical_axes[dim]!r}, size {size}) is not divisible "
                        f"by mesh axes {entry!r} of total size {parts} (preset {self.name!r}); "
                        f"pick mesh sizes that divide it")
        return NamedSharding(mesh, spec)


def _num_shards(axis_sizes: Mapping[str, int], entry) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(axis_sizes[n] for n in names)


def preset_of(mesh) -> str:
    """The first preset (dp, fsdp, fsdp_tp, fsdp_ep) whose axes hold every axis of ``mesh`` of
    size > 1."""
    used = {a for a in mesh.axis_names if mesh.shape[a] > 1 and a != PIPELINE_AXIS}
    for preset, axes in PRESET_AXES.items():
        if used <= set(axes):
            return preset
    raise ConfigError(f"mesh axes {sorted(used)} fit no preset ({PRESET_AXES})")


def rules_of(mesh_cfg) -> ShardingRules:
    """The rules of a ``mesh`` config section: its preset's, with the stacked ``layers`` split
    over ``stage`` when ``mesh.stage > 1``."""
    return rules_for(mesh_cfg.preset, stages=getattr(mesh_cfg, "stage", 1))


def rules_for(preset: str, stages: int = 1) -> ShardingRules:
    """The rules of one preset (``dp``, ``fsdp``, ``fsdp_tp``, ``fsdp_ep``); ``stages > 1``
    splits the stacked ``layers`` axis (and the pipeline's ``stage`` activations) over the
    ``stage`` mesh axis, so each device holds its stage's layers only."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown mesh preset {preset!r}; choose from {list(PRESETS)}")
    fsdp = ("fsdp",) if preset != "dp" else None
    tensor = ("tensor",) if preset == "fsdp_tp" else None
    table = {
        # activations
        "batch": BATCH_AXES, "seq": None,
        # weights
        "vocab": tensor, "embed": fsdp, "q_heads": tensor, "kv_heads": tensor,
        "head_dim": None, "mlp": tensor, "norm": None,
        "experts": ("expert",) if preset == "fsdp_ep" else None,
        # stacked layers (scan) stay whole, or one block per pipeline stage; LoRA rank whole
        "layers": (PIPELINE_AXIS,) if stages > 1 else None, "lora_rank": None,
        "stage": (PIPELINE_AXIS,) if stages > 1 else None,
    }
    return ShardingRules(preset, table)


# ----------------------------------------------------------------------------- meshes
def axis_sizes(mesh_cfg, num_devices: int) -> dict[str, int]:
    """Resolve the config's axis sizes (None → preset default, -1 → the rest) for a device count."""
    preset = mesh_cfg.preset
    if preset not in PRESETS:
        raise ConfigError(f"mesh.preset: unknown preset {preset!r}; choose from {list(PRESETS)}")
    sizes = {}
    stage = getattr(mesh_cfg, PIPELINE_AXIS, 1)
    if num_devices % stage:
        raise ConfigError(f"mesh.stage={stage} does not divide the {num_devices} devices")
    for axis in MESH_AXES:
        value = getattr(mesh_cfg, axis, 1)
        if value is None:
            value = -1 if axis == _REST_AXIS[preset] else 1
        sizes[axis] = value
    rest = [a for a, v in sizes.items() if v == -1]
    if len(rest) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {rest}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if rest:
        if num_devices % fixed:
            raise ConfigError(f"mesh: {num_devices} devices are not divisible by the fixed axis "
                                f"sizes {sizes} (product {fixed})")
        sizes[rest[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(f"mesh: axis sizes {sizes} multiply to {math.prod(sizes.values())}, "
                            f"but there are {num_devices} devices")
    for axis, size in sizes.items():
        if size > 1 and axis not in PRESET_AXES[preset] and axis != PIPELINE_AXIS:
            raise ConfigError(f"mesh.{axis}={size} is unused by preset {preset!r}; use "
                                f"{'fsdp_tp' if axis == 'tensor' else 'fsdp_ep'} or set it to 1")
    dcn = getattr(mesh_cfg, "dcn_data", 1)
    if sizes["data"] % dcn:
        raise ConfigError(f"mesh.dcn_data={dcn} must divide the data axis size {sizes['data']}")
    return sizes


def make_mesh(mesh_cfg, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``Mesh`` with axes ``(stage, data, fsdp, tensor, expert)`` (all ``AxisType.Auto``).

    Devices are laid out by ``mesh_utils`` so that the innermost axes sit on the fastest links.
    With ``mesh.dcn_data > 1`` the data axis is split across slices (TPU multi-slice) or, on
    other platforms, across processes (one granule per host) via ``create_hybrid_device_mesh``.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = axis_sizes(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    dcn = getattr(mesh_cfg, "dcn_data", 1)
    if dcn > 1:
        data = MESH_AXES.index("data")
        ici_shape = shape[:data] + (sizes["data"] // dcn,) + shape[data + 1:]
        dcn_shape = tuple(dcn if a == "data" else 1 for a in MESH_AXES)
        by_process = not hasattr(devices[0], "slice_index")
        device_array = mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices, process_is_granule=by_process,
            allow_split_physical_axes=True)
    else:
        device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_model(model_cfg, sizes: Mapping[str, int], repeats: int = 1) -> None:
    """Raise ConfigError when heads/experts do not divide the tensor/expert axes, or the layers
    do not split into ``stage`` × ``repeats`` (train.pipeline_repeats) equal pipeline blocks."""
    tensor, expert = sizes.get("tensor", 1), sizes.get("expert", 1)
    stages = sizes.get(PIPELINE_AXIS, 1)
    if stages * repeats > 1 and model_cfg.num_layers % (stages * repeats):
        raise ConfigError(f"model.num_layers={model_cfg.num_layers} is not divisible by "
                          f"mesh.stage={stages} x train.pipeline_repeats={repeats} = "
                          f"{stages * repeats} pipeline blocks")
    for field in ("num_heads", "num_kv_heads"):
        heads = getattr(model_cfg, field)
        if heads % tensor:
            raise ConfigError(f"model.{field}={heads} is not divisible by mesh.tensor={tensor}")
    experts = getattr(model_cfg, "num_experts", 0)
    if experts and experts % expert:
        raise ConfigError(f"model.num_experts={experts} is not divisible by mesh.expert={expert}")


# ----------------------------------------------------------------------------- placement
def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _variable_sharding(path, variable, mesh: Mesh, rules: ShardingRules) -> NamedSharding:
    where = jax.tree_util.keystr(path)
    logical = variable.get_metadata().get("logical_axes")
    shape = np.shape(variable.get_value())
    if logical is None:
        if isinstance(variable, nnx.Param):
            raise ConfigError(f"{where}: nnx.Param has no logical_axes metadata")
        return NamedSharding(mesh, PartitionSpec())    # step counters, rng keys, ...
    if len(logical) != len(shape) and not isinstance(variable, nnx.Param):
        # optimizer statistics of another rank (e.g. Adafactor's factored rows) copy the
        # param's metadata; they are small, keep them replicated.
        return NamedSharding(mesh, PartitionSpec())
    return rules.sharding(mesh, tuple(logical), shape, where=where)


def param_shardings(model_or_state, mesh: Mesh, rules: ShardingRules):
    """A pytree of ``NamedSharding`` with the structure of ``nnx.state(model_or_state)``.

    Accepts a module, an ``nnx.Optimizer`` or a ``State`` (concrete or from ``nnx.eval_shape``).
    Each ``nnx.Variable`` becomes a Variable of the same type whose value is its
    ``NamedSharding`` (like ``nnx.get_named_sharding``), so the result is a valid
    ``in_shardings``/``out_shardings`` for the state and a ``device_put`` target.
    Variables without ``logical_axes`` that are not Params (step counts, RNG state) are
    replicated; a Param without them is an error.
    """
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v.replace(_variable_sharding(path, v, mesh, rules)),
        state, is_leaf=_is_variable)


def variable_sharding(variable, mesh: Mesh, rules: ShardingRules, *, where: str = "array") -> NamedSharding:
    """The NamedSharding of one ``nnx.Variable`` (see :func:`param_shardings` for the policy)."""
    return _variable_sharding((jax.tree_util.GetAttrKey(where),), variable, mesh, rules)


def loader_shardings(model_cfg, mesh: Mesh, rules: ShardingRules):
    """The ``shardings=`` callable for ``medjax.load``: ``(param_path, shape) -> NamedSharding``.

    Built from the abstract Decoder's logical axes, so an HF import lands directly in the
    training layout and each process reads only the slices its devices hold.
    """
    from medjax.models import abstract_decoder
    flat = nnx.to_flat_state(param_shardings(abstract_decoder(model_cfg), mesh, rules))
    table = {tuple(path): var.get_value() for path, var in flat}

    def lookup(path, shape):
        try:
            return table[tuple(path)]
        except KeyError:
            raise ConfigError(f"no sharding for parameter {'.'.join(map(str, path))}") from None
    return lookup


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a global ``[B, ...]`` batch: rows split over ``data × fsdp × expert``."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    return _num_shards(mesh.shape, BATCH_AXES)


def global_batch(local_tree, mesh: Mesh):
    """Assemble per-process batches into global arrays sharded by :func:`batch_sharding`.

    Each process passes the rows of the global batch its devices hold (its disjoint data
    shard); in a single process this is just a sharded ``device_put``.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_tree)


def local_batch_rows(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of a global batch that this process's devices hold (its data shard).

    With devices ordered by process (``jax.devices()`` order, which ``make_mesh`` keeps), every
    process owns one contiguous, disjoint block; each process loads only those rows.
    """
    if global_batch_size % batch_shards(mesh):
        raise ConfigError(f"global batch size {global_batch_size} is not divisible by the "
                            f"{batch_shards(mesh)} batch shards (mesh data×fsdp×expert)")
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    starts = sorted({idx[0].start or 0 for idx in index_map.values()})
    stops = sorted({idx[0].stop or global_batch_size for idx in index_map.values()})
    if stops[-1] - starts[0] != len(starts) * (stops[0] - starts[0]):
        raise ConfigError("this process's batch rows are not contiguous; use a mesh whose batch "
                            "axes follow process order")
    return slice(starts[0], stops[-1])


def data_blocks(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """``(index, count)``: this process's rows are block ``index`` of ``count`` equal blocks of
    the global batch (:func:`local_batch_rows`). ``count`` is the process count when processes
    split the batch axes, fewer when an axis that replicates the batch (``stage``) spans
    processes: then several processes hold, and load, the same rows."""
    rows = local_batch_rows(mesh, global_batch_size)
    size = rows.stop - rows.start
    return rows.start // size, global_batch_size // size


def place(state, shardings):
    """``device_put`` of a pytree onto shardings; also works across processes (each process
    holding the full value, e.g. the same seeded init or a checkpoint read)."""
    return jax.tree.map(place_array, state, shardings)


def shard_model(model, mesh: Mesh, rules: ShardingRules):
    """Move every variable of ``model`` (module or Optimizer) to its sharding, in place."""
    state = nnx.state(model)
    nnx.update(model, place(state, param_shardings(state, mesh, rules)))
    return model


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def place_array(value, sharding: NamedSharding):
    """device_put that also works across processes (every process holds the full value), typed
    PRNG keys (LoRA dropout / NEFTune streams) included: their raw ``uint32`` data is placed and
    the key rewrapped on the devices."""
    if isinstance(value, jax.Array) and value.sharding == sharding:
        return value
    if _is_key(value):
        impl = jax.random.key_impl(value)
        data = place_array(jax.random.key_data(value), sharding)
        return jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl), out_shardings=sharding)(data)
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    host = np.asarray(jax.device_get(value))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def host_value(x) -> np.ndarray:
    """The whole value of ``x`` as numpy on every process. An array spread over several
    processes is gathered (``process_allgather``): a collective, so every process must call it,
    in the same order, even those that then write nothing."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def init_sharded(make_model, mesh: Mesh, rules: ShardingRules):
    """Build ``make_model()`` directly sharded: each device materialises only its shards.

    ``make_model`` is a zero-argument callable returning an nnx module (e.g.
    ``lambda: Decoder(cfg, rngs=nnx.Rngs(0))``). Use this for models too large for one device.
    """
    abstract = nnx.eval_shape(make_model)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract_state, mesh, rules)
    state = jax.jit(lambda: nnx.state(make_model()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def sharded_init(fn, *args, out_shardings):
    """``fn(*args)`` jitted with ``out_shardings`` and every input donated.

    Each device computes only its shards of the result (e.g. a train state's fp32 master copy
    and optimizer moments from loaded params), and inputs the result can alias (an fp32 param
    that becomes the master copy) are reused in place: no device holds more than its shard of
    the output plus what XLA needs for one op.
    """
    import warnings
    with warnings.catch_warnings():     # an input of another dtype (bf16 → fp32 master) is freed,
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        return jax.jit(fn, out_shardings=out_shardings,
                       donate_argnums=tuple(range(len(args))))(*args)
