"""Grouped matmul for MoE experts: each group of rows times its own weight, cost following the rows.

``grouped_matmul(x[M, K], w[G, K, N], group_sizes[G]) -> [M, N]`` has ``jax.lax.ragged_dot``'s
contract: the rows of ``x`` are sorted by group, group ``g`` owns the next ``group_sizes[g]``
rows and is multiplied by ``w[g]`` (``w[g].T`` with ``transpose_rhs=True``, ``w`` then being
``[G, N, K]``). Rows past ``sum(group_sizes)`` come out zero.

Implementations, chosen by the platform the call is LOWERED for (``lax.platform_dependent``,
so a CPU host compiling for TPU devices takes the TPU branch):

* ``"ragged_dot"`` (TPU): ``jax.lax.ragged_dot`` for the forward and dx (XLA:TPU has a native
  grouped matmul); dw uses the blocked loop below (XLA:TPU's ragged weight transpose is dense).
* ``"blocked"`` (CPU, GPU): XLA elsewhere rewrites ``ragged_dot`` into a dense contraction over
  all G groups (G× the useful FLOPs). Instead, each group is padded to a multiple of
  ``block_rows`` (a gather into a ``[P, K]`` buffer, ``P`` a static bound), and a ``while`` loop
  runs over the blocks actually used, ``sum(ceil(group_sizes / block_rows))`` of them: block
  ``b`` is one ``[block_rows, K] @ [K, N]`` dot against ``w[group_of_block[b]]`` read in place
  (a dynamic index, no ``[blocks, K, N]`` copy of the weights). Empty groups cost nothing, and a
  few decode rows pay one small block per *used* group. The backward (``custom_vjp``) runs one
  loop over the same blocks computing ``dx`` (``g @ w.T``) and ``dw`` (``x_blk.T @ g_blk``
  summed in fp32 over the group's consecutive blocks), each only when its input is being differentiated.
  (jax 0.10.2's ``jax_ragged_dot_use_gpu_pallas_triton_lowering`` flag imports a module the
  wheel does not ship, so the GPU takes this path too.)

Cost: ``2 * M * K * N`` useful FLOPs; the blocked path executes ``2 * R * K * N`` with
``R = sum(ceil(group_sizes / b) * b) <= M + min(G, M) * (b - 1)`` rows (:func:`padded_rows`),
plus the padded buffers ``[P, K]`` and ``[P, N]`` as temporaries. An XLA cost analysis counts the
loop body once; multiply it by :func:`num_blocks` to get the executed FLOPs.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

_IMPLEMENTATIONS = ("auto", "blocked", "ragged_dot")
MAX_BLOCK_ROWS = 64

__all__ = ["BlockLayout", "block_layout", "grouped_matmul", "grouped_matmul_reference",
           "default_block_rows", "max_blocks", "num_blocks", "padded_rows"]


def default_block_rows(rows: int, groups: int) -> int:
    """Rows per block: ~1/4 of an even group's rows (padding ~12% at worst, ~6% on average), a
    power of two in [8, 64]; a handful of decode rows get an 8-row block. (Measured on CPU:
    32-row blocks ran 1.9x the dense time, 64 and 128 1.6x; 64 keeps the padding lower.)"""
    target = max(1, rows // (4 * groups))
    return int(min(MAX_BLOCK_ROWS, max(8, 1 << (target.bit_length() - 1))))


def max_blocks(rows: int, groups: int, block_rows: int) -> int:
    """Static bound on blocks: each used group wastes at most ``block_rows - 1`` padded rows."""
    return max(1, (rows + min(groups, rows) * (block_rows - 1)) // block_rows)


def num_blocks(group_sizes_G, block_rows: int):
    """Blocks the loop executes for these group sizes (its trip count)."""
    return jnp.sum((group_sizes_G + block_rows - 1) // block_rows)


def padded_rows(group_sizes_G, block_rows: int):
    """Rows the blocked path multiplies (each group rounded up to ``block_rows``)."""
    return num_blocks(group_sizes_G, block_rows) * block_rows


def grouped_matmul_reference(x_MK, w_GKN, group_sizes_G, *, transpose_rhs=False):
    """Dense reference: every row against every group's weight, masked (G× the FLOPs)."""
    w = jnp.swapaxes(w_GKN, 1, 2) if transpose_rhs else w_GKN
    ends = jnp.cumsum(group_sizes_G)
    group_M = jnp.searchsorted(ends, jnp.arange(x_MK.shape[0]), side="right")
    y_GMN = jnp.einsum("mk,gkn->gmn", x_MK, w, preferred_element_type=jnp.float32)
    onehot_GM = (group_M[None, :] == jnp.arange(w.shape[0])[:, None]).astype(jnp.float32)
    return jnp.einsum("gmn,gm->mn", y_GMN, onehot_GM).astype(x_MK.dtype)


# ------------------------------------------------------------------------------ block layout
class BlockLayout(NamedTuple):
    """Rows padded so each group fills whole blocks: padded row ``p`` holds sorted row
    ``src_P[p]`` (``rows`` = a zero padding row). Build with :func:`block_layout`; callers that
    keep their activations in this ``[P, ...]`` layout (the MoE layer) pay the pad once."""
    src_P: jax.Array             # [P] padded row -> sorted row, or `rows` for padding
    dst_M: jax.Array             # [M] sorted row -> padded row
    group_of_block: jax.Array    # [max_blocks] group each block belongs to
    used_blocks: jax.Array       # scalar: blocks holding rows (the loop's trip count)
    padded_sizes_G: jax.Array    # [G] group sizes rounded up to whole blocks

    @property
    def block_rows(self) -> int:
        return self.src_P.shape[0] // self.group_of_block.shape[0]

    def pad(self, x_MK):
        return jnp.take(x_MK, self.src_P, axis=0, mode="fill", fill_value=0)

    def unpad(self, y_PN):
        rows = self.dst_M.shape[0]
        # A row past sum(group_sizes) maps to some padded row that is not its own: zero it.
        valid_M = self.src_P[self.dst_M] == jnp.arange(rows)
        return jnp.where(valid_M[:, None], y_PN[self.dst_M], 0)


def block_layout(group_sizes_G, rows: int, block_rows: int | None = None) -> BlockLayout:
    """The padded layout of ``rows`` sorted rows split into groups of ``group_sizes_G``."""
    G = group_sizes_G.shape[0]
    b = block_rows or default_block_rows(rows, G)
    nb = max_blocks(rows, G, b)
    sizes = group_sizes_G.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    padded = (sizes + b - 1) // b * b
    padded_ends = jnp.cumsum(padded)
    padded_starts = padded_ends - padded
    row_M = jnp.arange(rows, dtype=jnp.int32)
    group_M = jnp.minimum(jnp.searchsorted(ends, row_M, side="right", method="compare_all"), G - 1)
    dst_M = jnp.where(row_M < ends[-1], padded_starts[group_M] + row_M - starts[group_M], nb * b - 1)
    p_P = jnp.arange(nb * b, dtype=jnp.int32)
    group_P = jnp.minimum(jnp.searchsorted(padded_ends, p_P, side="right", method="compare_all"),
                          G - 1)
    offset_P = p_P - padded_starts[group_P]
    src_P = jnp.where(offset_P < sizes[group_P], starts[group_P] + offset_P, rows)
    used = jnp.minimum(padded_ends[-1] // b, nb)
    return BlockLayout(src_P, jnp.minimum(dst_M, nb * b - 1), group_P[::b], used, padded)


def _group_weight(w, group):
    """``w[group]`` read inside the loop. The barrier keeps XLA:CPU from hoisting its bf16->f32
    dot upcast out of the loop, which would copy ALL of ``w`` to f32 (a [G, K, N] temporary)."""
    return jax.lax.optimization_barrier(jax.lax.dynamic_index_in_dim(w, group, keepdims=False))


def _fresh_zeros(shape, dtype, tie):
    """Zeros for a loop buffer. XLA would merge equal zero broadcasts of different loops into
    one and then COPY it into each loop (a whole [G, K, N] temporary for ``dw``); a fill value
    computed from this call's ``tie`` array keeps each buffer its own (``0 * v`` is not folded
    for floats)."""
    return jnp.full(shape, (tie.reshape(-1)[0] * 0).astype(dtype), dtype)


def _dot(a, b, contract_b: int):
    return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())),
                               preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------ blocked path
def _blocked_forward(x_PK, w, layout, transpose_rhs):
    b = layout.block_rows
    N = w.shape[1] if transpose_rhs else w.shape[2]

    def body(i, y_PN):
        x_bK = jax.lax.dynamic_slice_in_dim(x_PK, i * b, b)
        w_g = _group_weight(w, layout.group_of_block[i])
        y_bN = _dot(x_bK, w_g, 1 if transpose_rhs else 0).astype(x_PK.dtype)
        return jax.lax.dynamic_update_slice_in_dim(y_PN, y_bN, i * b, 0)

    return jax.lax.fori_loop(0, layout.used_blocks, body, _fresh_zeros((x_PK.shape[0], N), x_PK.dtype, w))


def _blocked_backward(x_PK, w, layout, g_PN, transpose_rhs, want_dx, want_dw):
    """``(dx, dw)``; either is None when not wanted. One loop over the used blocks.

    fp32 ``w``: each block adds into ``dw[group]`` in place. Other dtypes: a group's blocks are
    consecutive, so its ``dw`` is summed in one fp32 ``[K, N]`` accumulator that restarts at each
    new group and is written (in ``w``'s dtype) into ``dw[group]`` after every block: the
    group's last write holds its full sum. No ``[G, K, N]`` fp32 buffer either way."""
    b = layout.block_rows
    g_PN = g_PN.astype(x_PK.dtype)
    dx_PK = _fresh_zeros(x_PK.shape, x_PK.dtype, g_PN) if want_dx else None
    dw = _fresh_zeros(w.shape, w.dtype, g_PN) if want_dw else None
    direct = w.dtype == jnp.float32          # fp32 weights: add into dw[group] in place
    acc = _fresh_zeros(w.shape[1:], jnp.float32, x_PK) if want_dw and not direct else None

    def body(i, carry):
        dx_PK, dw, acc = carry
        grp = layout.group_of_block[i]
        g_bN = jax.lax.dynamic_slice_in_dim(g_PN, i * b, b)
        if want_dx:       # dx = g @ w.T   (w [K, N]; or w [N, K] when transposed)
            w_g = _group_weight(w, grp)
            dx_bK = _dot(g_bN, w_g, 0 if transpose_rhs else 1).astype(x_PK.dtype)
            dx_PK = jax.lax.dynamic_update_slice_in_dim(dx_PK, dx_bK, i * b, 0)
        if want_dw:       # dw[grp] += x.T @ g   (or g.T @ x when transposed)
            x_bK = jax.lax.dynamic_slice_in_dim(x_PK, i * b, b)
            lhs, rhs = (g_bN, x_bK) if transpose_rhs else (x_bK, g_bN)
            d = jax.lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
            if direct:
                d = jax.lax.dynamic_index_in_dim(dw, grp, keepdims=True) + d[None]
            else:
                first = (i == 0) | (grp != layout.group_of_block[jnp.maximum(i - 1, 0)])
                acc = jnp.where(first, 0.0, acc) + d
                d = acc.astype(w.dtype)[None]
            dw = jax.lax.dynamic_update_index_in_dim(dw, d, grp, 0)
        return dx_PK, dw, acc

    dx_PK, dw, _ = jax.lax.fori_loop(0, layout.used_blocks, body, (dx_PK, dw, acc))
    return dx_PK, dw


# ------------------------------------------------------------------------------ ragged_dot path
def _ragged(x_PK, w, layout, transpose_rhs):
    # Padding rows are zero and rows past the used blocks belong to no group: both give zeros.
    w = jnp.swapaxes(w, 1, 2) if transpose_rhs else w
    return jax.lax.ragged_dot(x_PK, w, layout.padded_sizes_G)


def _ragged_backward(x_PK, w, layout, g_PN, transpose_rhs, want_dx, want_dw):
    """dx is a ``ragged_dot`` against the transposed weights (native on TPU); dw is not: XLA:TPU
    (jax 0.10.2) computes ``ragged_dot``'s weight transpose densely over all groups (8× the
    FLOPs at E = 8), so dw takes the blocked loop."""
    dx = _ragged(g_PN.astype(x_PK.dtype), w, layout, not transpose_rhs) if want_dx else None
    dw = _blocked_backward(x_PK, w, layout, g_PN, transpose_rhs, False, True)[1] if want_dw else None
    return dx, dw


# ------------------------------------------------------------------------------ dispatch
def _by_platform(impl, blocked, ragged, *args):
    if impl == "blocked":
        return blocked(*args)
    if impl == "ragged_dot":
        return ragged(*args)
    return jax.lax.platform_dependent(*args, tpu=ragged, default=blocked)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(x_PK, w, layout, transpose_rhs, impl):
    return _by_platform(impl, functools.partial(_blocked_forward, transpose_rhs=transpose_rhs),
                        functools.partial(_ragged, transpose_rhs=transpose_rhs), x_PK, w, layout)


def _gmm_fwd(x_PK, w, layout, transpose_rhs, impl):
    layout = jax.tree.map(lambda v: v.value, layout)
    y = _gmm(x_PK.value, w.value, layout, transpose_rhs, impl)
    return y, (x_PK.value, w.value, layout, x_PK.perturbed, w.perturbed)


def _gmm_bwd(transpose_rhs, impl, res, g_PN):
    x_PK, w, layout, want_dx, want_dw = res
    kw = dict(transpose_rhs=transpose_rhs, want_dx=want_dx, want_dw=want_dw)
    dx, dw = _by_platform(impl, functools.partial(_blocked_backward, **kw),
                          functools.partial(_ragged_backward, **kw), x_PK, w, layout, g_PN)
    dx = jnp.zeros_like(x_PK) if dx is None else dx
    dw = jnp.zeros_like(w) if dw is None else dw
    return dx, dw, jax.tree.map(lambda _: None, layout)


_gmm.defvjp(_gmm_fwd, _gmm_bwd, symbolic_zeros=True)


def grouped_matmul(x, w, groups, *, transpose_rhs=False, block_rows=None, implementation="auto"):
    """``ragged_dot(x, w, group_sizes)`` (``w.swapaxes(1, 2)`` with ``transpose_rhs``) whose
    cost follows the rows; differentiable in ``x`` and ``w``. See the module docstring.

    ``groups`` is either ``group_sizes [G]`` (``x [M, K]`` sorted by group; padded and unpadded
    here) or a :class:`BlockLayout` (``x [P, K]`` already in that padded layout; so is the
    result)."""
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown grouped_matmul implementation {implementation!r}; "
                         f"choose one of {_IMPLEMENTATIONS}")
    G = w.shape[0]
    padded = isinstance(groups, BlockLayout)
    sizes_shape = groups.padded_sizes_G.shape if padded else groups.shape
    if x.ndim != 2 or w.ndim != 3 or sizes_shape != (G,):
        raise ValueError(f"grouped_matmul: x [M, K], w [G, K, N], groups [G]; got {x.shape}, "
                         f"{w.shape}, {sizes_shape}")
    K = w.shape[2] if transpose_rhs else w.shape[1]
    if x.shape[1] != K:
        raise ValueError(f"grouped_matmul: x has {x.shape[1]} columns, w contracts {K}")
    w = w.astype(x.dtype)
    if padded:
        return _gmm(x, w, groups, bool(transpose_rhs), implementation)
    layout = block_layout(groups, x.shape[0], block_rows)
    return layout.unpad(_gmm(layout.pad(x), w, layout, bool(transpose_rhs), implementation))
