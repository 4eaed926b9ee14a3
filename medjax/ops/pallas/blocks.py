"""Pieces shared by the flash-attention kernels: backend choice, padded metadata, block ranges.

Masking inside the kernels is carried by four small int32 arrays instead of a dense mask:
query positions / segments ``[B, Tp, 1]`` and key positions / segments ``[B, 1, Sp]``.
Keys that must never be seen (beyond ``kv_lengths`` or padding up to a block multiple) get
the segment id ``INVALID_SEGMENT``, which no query carries, so one equality test covers
packing, ragged caches and padding. Padded query rows copy the last real row (their outputs
are sliced away and their output-gradients are zero, so they add nothing to dK/dV).

Skipping: for every (batch, query block) the wrapper computes, with cheap jnp reductions over
block-level min/max of positions and segments, the first and last key block that can hold a
visible key; the kernel loops only over that range (causal upper triangle, out-of-window blocks,
blocks of other segments at the edges and blocks past ``kv_lengths`` are never visited). Inside
the range the kernel tests the [bq, bk] tile mask and, if it is empty, skips both matmuls with
``lax.cond`` (holes between segments). The same code runs in interpret mode on CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

INVALID_SEGMENT = jnp.iinfo(jnp.int32).min
# "interpret" runs the Triton-structured kernels on CPU, "mosaic_interpret" the TPU-structured
# ones (key blocks as a grid axis, VMEM scratch, scalar prefetch); both for tests.
BACKENDS = ("triton", "mosaic_tpu", "interpret", "mosaic_interpret")
KV_GRID_BACKENDS = ("mosaic_tpu", "mosaic_interpret")

# (block_q, block_k) per TPU generation, sized so that every kernel's double-buffered blocks,
# scratch and [bq, bk] fp32 temporaries stay inside the default scoped VMEM (16 MiB v4/v5e/v5p,
# 32 MiB v6e); checked by the compile-only tests, not tuned on hardware.
TPU_BLOCKS = {"v4": (512, 512), "v5e": (512, 512), "v5p": (512, 512), "v6e": (512, 1024)}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static (hashable) description of one attention call."""
    scale: float
    causal: bool
    window: Optional[int]
    masked: bool          # False only when no element can be masked (skip all mask work)
    block_q: int
    block_k: int
    backend: str          # one of BACKENDS
    heads_first: bool     # True: arrays laid out [B, H, T, D]; False: native [B, T, H, D]
    fp32: bool            # fp32 inputs -> full-precision MXU/tensor-core dots

    @property
    def kv_grid(self) -> bool:
        """True: key blocks are a sequential grid axis (TPU); False: a loop inside the kernel."""
        return self.backend in KV_GRID_BACKENDS

    @property
    def precision(self):
        return lax.Precision.HIGHEST if self.fp32 else None


PLATFORM_BACKENDS = {"cuda": "triton", "rocm": "triton", "tpu": "mosaic_tpu", "cpu": "interpret"}


def backend_for(platform: str) -> str:
    """The Pallas backend that compiles for ``platform`` ('cpu' | 'cuda' | 'rocm' | 'tpu')."""
    return PLATFORM_BACKENDS.get(platform, "interpret")


def default_backend() -> str:
    """Backend for a kernel called directly, without a target: the host's. Through
    ``medjax.ops.attention`` the platform the program is compiled for decides instead
    (``medjax.ops.target.on_target`` + :func:`backend_for`)."""
    from medjax.ops.target import host_platform
    return backend_for(host_platform())


_POISON_OUTPUTS = [False]


@contextlib.contextmanager
def poisoned_outputs():
    """Trace-time test switch: every output starts as a NaN buffer (aliased into the kernel), so
    an element a kernel forgets to write shows up as NaN instead of a lucky zero."""
    _POISON_OUTPUTS[0] = True
    try:
        yield
    finally:
        _POISON_OUTPUTS[0] = False


def pallas_call(kernel, cfg: KernelConfig, *, grid, in_specs, out_specs, out_shape,
                head_dim: int, name: str, num_scalar_prefetch: int = 0, scratch_shapes=(),
                sequential_axes: int = 0, cost=None):
    """``pl.pallas_call`` with the backend's compiler params (Triton, Mosaic TPU, interpret).

    ``num_scalar_prefetch`` leading arguments go to SMEM before the grid runs and are passed to
    every index map (TPU); the last ``sequential_axes`` grid axes are "arbitrary" (they carry
    scratch state from step to step), the others "parallel". ``cost``: ``pl.CostEstimate``.
    """
    kwargs = {}
    if cfg.backend == "triton":
        from jax.experimental.pallas import triton as plgpu
        kwargs["compiler_params"] = plgpu.CompilerParams(
            num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    elif cfg.backend == "mosaic_tpu":
        from jax.experimental.pallas import tpu as pltpu
        semantics = ("parallel",) * (len(grid) - sequential_axes) + ("arbitrary",) * sequential_axes
        kwargs["compiler_params"] = pltpu.CompilerParams(dimension_semantics=semantics)
    elif cfg.backend in ("interpret", "mosaic_interpret"):
        kwargs["interpret"] = True
    else:
        raise ValueError(f"unknown Pallas backend {cfg.backend!r}; choose one of {BACKENDS}")
    if cost is not None:
        kwargs["cost_estimate"] = cost
    poison = _POISON_OUTPUTS[0]
    outs = list(out_shape) if isinstance(out_shape, (list, tuple)) else [out_shape]
    specs = list(out_specs) if isinstance(out_specs, (list, tuple)) else [out_specs]
    n_in = num_scalar_prefetch + len(in_specs)
    body = kernel
    if poison:
        in_specs = [*in_specs, *specs]

        def body(*refs):   # drop the poisoned input buffers; outputs alias them
            kernel(*refs[:n_in], *refs[n_in + len(outs):])
        kwargs["input_output_aliases"] = {n_in + i: i for i in range(len(outs))}
    if num_scalar_prefetch or scratch_shapes:
        from jax.experimental.pallas import tpu as pltpu
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=num_scalar_prefetch, grid=grid, in_specs=in_specs,
            out_specs=out_specs, scratch_shapes=list(scratch_shapes))
        call = pl.pallas_call(body, grid_spec=grid_spec, out_shape=out_shape, name=name, **kwargs)
    else:
        call = pl.pallas_call(body, grid=grid, in_specs=in_specs, out_specs=out_specs,
                              out_shape=out_shape, name=name, **kwargs)
    if not poison:
        return call
    return lambda *args: call(*args, *[jnp.full(o.shape, jnp.nan, o.dtype) for o in outs])


def attention_cost(*, batch, heads, q_rows, keys, head_dim, causal, window, passes,
                   bytes_accessed) -> pl.CostEstimate:
    """Cost of an attention kernel for XLA's cost analysis: ``passes`` [rows, keys] x D matmuls
    over the (statically estimated) visible pairs, one exp per pair."""
    pairs = q_rows * keys
    if window is not None:
        pairs = q_rows * min(keys, window)
    elif causal and q_rows == keys:
        pairs = q_rows * (keys + 1) // 2
    pairs *= batch * heads
    return pl.CostEstimate(flops=int(2 * passes * pairs * head_dim), transcendentals=int(pairs),
                           bytes_accessed=int(bytes_accessed))


def scalar_table_spec(cfg: KernelConfig):
    """Spec for a small int32 table read with scalar indices (block ranges)."""
    if cfg.backend == "mosaic_tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec(memory_space=None)


def clamped_block(lo_ref, hi_ref, b, r, t):
    """Block visited at sequential grid step ``t`` of range ``[lo, hi)`` (row ``(b, r)`` of the
    prefetched tables): ``lo + t``, clamped to the last needed block. Steps past the range
    repeat the previous block index, so the pipeline issues no DMA for them."""
    return jnp.minimum(lo_ref[b, r] + t, jnp.maximum(hi_ref[b, r] - 1, 0))


def tpu_generation() -> str | None:
    """"v5p", "v6e", ... of the TPU Mosaic is compiling for (the real chip, or the compile-only
    target of ``tpu_compile.target_chip``); None when there is none."""
    try:
        from jax._src.pallas.mosaic import tpu_info
        return "v" + tpu_info.get_tpu_info().chip_version.value
    except Exception:  # not a TPU (CPU interpret, GPU) or private API moved
        return None


def default_blocks(backend: str) -> tuple[int, int]:
    """(block_q, block_k) for a backend; on TPU per chip generation (``TPU_BLOCKS``)."""
    if backend == "mosaic_tpu":
        return TPU_BLOCKS.get(tpu_generation(), (512, 512))
    return {"triton": (64, 64)}.get(backend, (32, 32))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_axis(x, axis: int, size: int, mode="constant", value=0):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    if mode == "edge":
        return jnp.pad(x, widths, mode="edge")
    return jnp.pad(x, widths, constant_values=value)


def padded_metadata(q_pos_BT, q_seg_BT, kv_pos_BS, kv_seg_BS, kv_lengths_B, Tp, Sp):
    """Pad metadata to block multiples; fold kv_lengths/padding into ``INVALID_SEGMENT``."""
    B, S = kv_pos_BS.shape
    kv_valid_BS = jnp.ones((B, S), bool)
    if kv_lengths_B is not None:
        kv_valid_BS &= jnp.arange(S)[None, :] < jnp.asarray(kv_lengths_B)[:, None]
    kv_seg_BS = jnp.where(kv_valid_BS, kv_seg_BS, INVALID_SEGMENT)
    q_pos_BT = pad_axis(q_pos_BT, 1, Tp, mode="edge")
    q_seg_BT = pad_axis(q_seg_BT, 1, Tp, mode="edge")
    kv_pos_BS = pad_axis(kv_pos_BS, 1, Sp, mode="edge")
    kv_seg_BS = pad_axis(kv_seg_BS, 1, Sp, value=INVALID_SEGMENT)
    return q_pos_BT, q_seg_BT, kv_pos_BS, kv_seg_BS


def block_visibility(q_pos_BT, q_seg_BT, kv_pos_BS, kv_seg_BS, *, block_q, block_k,
                     causal, window):
    """Conservative ``[B, nq, nk]`` flags: False only if the (q block, k block) tile is empty."""
    B, Tp = q_pos_BT.shape
    Sp = kv_pos_BS.shape[1]
    big = jnp.iinfo(jnp.int32).max
    qpos_BIQ = q_pos_BT.reshape(B, Tp // block_q, block_q)
    qseg_BIQ = q_seg_BT.reshape(B, Tp // block_q, block_q)
    kvpos_BJK = kv_pos_BS.reshape(B, Sp // block_k, block_k)
    kvseg_BJK = kv_seg_BS.reshape(B, Sp // block_k, block_k)
    valid_BJK = kvseg_BJK != INVALID_SEGMENT
    kpos_min = jnp.min(jnp.where(valid_BJK, kvpos_BJK, big), -1)[:, None, :]
    kpos_max = jnp.max(jnp.where(valid_BJK, kvpos_BJK, -big), -1)[:, None, :]
    kseg_min = jnp.min(jnp.where(valid_BJK, kvseg_BJK, big), -1)[:, None, :]
    kseg_max = jnp.max(jnp.where(valid_BJK, kvseg_BJK, -big), -1)[:, None, :]
    qpos_min, qpos_max = qpos_BIQ.min(-1)[:, :, None], qpos_BIQ.max(-1)[:, :, None]
    qseg_min, qseg_max = qseg_BIQ.min(-1)[:, :, None], qseg_BIQ.max(-1)[:, :, None]
    visible_BIJ = jnp.any(valid_BJK, -1)[:, None, :]
    visible_BIJ &= (qseg_min <= kseg_max) & (kseg_min <= qseg_max)
    if causal:
        visible_BIJ &= qpos_max >= kpos_min
    if window is not None:
        # int64-free: qpos_min - kpos_max < window  <=>  qpos_min < kpos_max + window
        visible_BIJ &= qpos_min < kpos_max + window
    return visible_BIJ


def visible_range(visible_BIJ):
    """First and one-past-last True along the last axis: ``(lo, hi)`` int32; empty -> (0, 0)."""
    n = visible_BIJ.shape[-1]
    any_visible = jnp.any(visible_BIJ, -1)
    lo = jnp.argmax(visible_BIJ, -1)
    hi = n - jnp.argmax(visible_BIJ[..., ::-1], -1)
    lo = jnp.where(any_visible, lo, 0).astype(jnp.int32)
    hi = jnp.where(any_visible, hi, 0).astype(jnp.int32)
    return lo, hi


# ---------------------------------------------------------------- in-kernel helpers
def tile_mask(qpos_Q1, qseg_Q1, kvpos_1K, kvseg_1K, cfg: KernelConfig):
    """Boolean [bq, bk] mask of one tile from the loaded metadata."""
    mask_QK = qseg_Q1 == kvseg_1K
    if cfg.causal:
        mask_QK &= qpos_Q1 >= kvpos_1K
    if cfg.window is not None:
        mask_QK &= qpos_Q1 < kvpos_1K + cfg.window
    return mask_QK


def tile_is_empty(mask_QK):
    return jnp.max(jnp.max(mask_QK.astype(jnp.int32), axis=1), axis=0) == 0


def skip_if_empty(mask_QK, compute, carry):
    """Run ``compute(carry)`` only when the tile has a visible element (real skip, not masking)."""
    return lax.cond(tile_is_empty(mask_QK), lambda c: c, compute, carry)


def dot_nt(a_MD, b_ND, cfg):
    """a @ b.T with fp32 accumulation."""
    return lax.dot_general(a_MD, b_ND, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32, precision=cfg.precision)


def dot_nn(a_MK, b_KD, cfg):
    return lax.dot_general(a_MK, b_KD, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32, precision=cfg.precision)


def dot_tn(a_KM, b_KD, cfg):
    """a.T @ b with fp32 accumulation."""
    return lax.dot_general(a_KM, b_KD, (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32, precision=cfg.precision)


def softmax_step(carry, q_QD, k_KD, v_KD, mask_QK, cfg: KernelConfig):
    """One key tile of the online softmax: ``(m, l, acc)`` fp32 -> updated."""
    m_Q1, l_Q1, acc_QD = carry
    s_QK = dot_nt(q_QD, k_KD, cfg) * cfg.scale
    if mask_QK is not None:
        s_QK = jnp.where(mask_QK, s_QK, -jnp.inf)
    m_new = jnp.maximum(m_Q1, jnp.max(s_QK, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # rows with nothing visible yet
    p_QK = jnp.exp(s_QK - m_safe)
    alpha_Q1 = jnp.exp(m_Q1 - m_safe)
    l_new = alpha_Q1 * l_Q1 + jnp.sum(p_QK, axis=1, keepdims=True)
    acc_new = alpha_Q1 * acc_QD + dot_nn(p_QK.astype(v_KD.dtype), v_KD, cfg)
    return m_new, l_new, acc_new


def contiguous_kv(k_ref, v_ref, bk):
    """Key-block loader over ``[Sp, D]`` refs: block ``j`` is rows ``[j*bk, (j+1)*bk)``."""
    def load(j):
        start = pl.multiple_of(j * bk, bk)
        return k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
    return load


def online_softmax(q_QD, qpos_Q1, qseg_Q1, kv_block, kvpos_ref, kvseg_ref, lo, hi,
                   cfg: KernelConfig):
    """Flash-attention inner loop over key blocks ``[lo, hi)``: returns (m, l, acc) in fp32.

    ``kv_block(j)`` loads key block ``j`` as ``(k [bk, D], v [bk, D])`` (:func:`contiguous_kv`,
    or one page of a paged pool); it is called only for tiles with a visible key.
    ``kvpos_ref``/``kvseg_ref`` are ``[1, Sp]``, indexed by key position.
    """
    rows, D = q_QD.shape
    bk = cfg.block_k

    def step(carry, j, mask_QK):
        k_KD, v_KD = kv_block(j)
        return softmax_step(carry, q_QD, k_KD, v_KD, mask_QK, cfg)

    def body(j, carry):
        if not cfg.masked:
            return step(carry, j, None)
        start = pl.multiple_of(j * bk, bk)
        mask_QK = tile_mask(qpos_Q1, qseg_Q1, kvpos_ref[:, pl.ds(start, bk)],
                            kvseg_ref[:, pl.ds(start, bk)], cfg)
        return skip_if_empty(mask_QK, lambda c: step(c, j, mask_QK), carry)

    return lax.fori_loop(lo, hi, body, softmax_init(rows, D))


def softmax_init(rows, D):
    return (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, D), jnp.float32))


def finish_softmax(m_Q1, l_Q1, acc_QD):
    """Normalised output (zeros for rows that saw nothing) and log-sum-exp (-inf there)."""
    empty = l_Q1 == 0.0
    out_QD = acc_QD / jnp.where(empty, 1.0, l_Q1)
    lse_Q1 = jnp.where(empty, -jnp.inf, m_Q1 + jnp.log(jnp.where(empty, 1.0, l_Q1)))
    return out_QD, lse_Q1
