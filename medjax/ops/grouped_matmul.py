"""Grouped matmul for MoE experts: each group of rows times its own weight, cost following the rows.

``grouped_matmul(x[M, K], w[G, K, N], group_sizes[G]) -> [M, N]`` has ``jax.lax.ragged_dot``'s
contract: the rows of ``x`` are sorted by group, group ``g`` owns the next ``group_sizes[g]``
rows and is multiplied by ``w[g]`` (``w[g].T`` with ``transpose_rhs=True``, ``w`` then being
``[G, N, K]``). Rows past ``sum(group_sizes)`` come out zero.

Implementations, chosen by the platform the call is LOWERED for (``lax.platform_dependent``,
so a CPU host compiling for TPU devices takes the TPU branch):

* ``"ragged_dot"`` (TPU): ``jax.lax.ragged_dot`` for the forward and dx (XLA:TPU has a native
  grouped matmul), on the routed rows only (the padded layout is undone around it, so the padding
  rows cost no FLOPs); dw uses the blocked loops below (XLA:TPU's ragged weight transpose is dense).
* ``"blocked"`` (CPU, GPU): XLA elsewhere rewrites ``ragged_dot`` into a dense contraction over
  all G groups (G× the useful FLOPs). Instead, each group is padded to a multiple of
  ``block_rows`` (a gather into a ``[P, K]`` buffer, ``P`` a static bound), and two nested
  ``while`` loops run over the groups that hold rows and over each one's blocks,
  ``sum(ceil(group_sizes / block_rows))`` blocks in all: block ``b`` is one
  ``[block_rows, K] @ [K, N]`` dot against its group's weight read in place (a dynamic index, no
  ``[blocks, K, N]`` copy of the weights), in column chunks of at most ``CHUNK_ELEMENTS`` (a
  third, static loop: XLA:CPU copies the slice a dot reads). Empty groups cost nothing, and a
  few decode rows pay one small block per *used* group. The backward (``custom_vjp``) runs one
  pass over the same blocks computing ``dx`` (``g @ w.T``) and ``dw`` (``x_blk.T @ g_blk``
  summed in fp32 over the group's blocks), each only when its input is being differentiated.
  (jax 0.10.2's ``jax_ragged_dot_use_gpu_pallas_triton_lowering`` flag imports a module the
  wheel does not ship, so the GPU takes this path too.)

Frozen weights held in another form — QLoRA's nf4/int8 expert codes — are passed as a
:class:`GroupWeights` source: the loop over groups materialises ONE group's weight (dequantizes
one expert) before running its blocks, forward and dx, on every platform. A QLoRA MoE layer thus
never holds the ``[G, K, N]`` float weights, and no dequantized weight depends on the frozen
codes alone, which XLA would otherwise hoist out of the micro-batch loop (measured on a
compile-only H100: 8.3 GiB of temporaries for a 2-layer Mixtral QLoRA step before, 3.6 after).

Cost: ``2 * M * K * N`` useful FLOPs; the blocked path executes ``2 * R * K * N`` with
``R = sum(ceil(group_sizes / b) * b) <= M + min(G, M) * (b - 1)`` rows (:func:`padded_rows`),
plus the padded buffers ``[P, K]`` and ``[P, N]`` as temporaries. An XLA cost analysis counts a
loop body once; multiply the block loops by :func:`num_blocks` (and the chunk loops by their
static count) to get the executed FLOPs.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

_IMPLEMENTATIONS = ("auto", "blocked", "ragged_dot")
MAX_BLOCK_ROWS = 64

__all__ = ["BlockLayout", "GroupWeights", "block_layout", "column_chunks", "grouped_matmul",
           "grouped_matmul_reference", "default_block_rows", "max_blocks", "num_blocks",
           "padded_rows"]


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
    sizes_G: jax.Array           # [G] group sizes (rows actually routed)

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
    return BlockLayout(src_P, jnp.minimum(dst_M, nb * b - 1), group_P[::b], used, padded, sizes)


class GroupWeights:
    """Frozen ``[G, K, N]`` weights held in another form (e.g. nf4 codes) and materialised ONE
    group at a time inside the grouped matmul's loop over groups, so no ``[G, K, N]`` float copy
    ever exists (and none can be hoisted out of an outer loop: each fetch depends on the loop's
    group index). Subclasses are pytrees, set ``shape`` (the dense ``[G, K, N]``) and implement
    :meth:`group`. No gradient flows to them (QLoRA's frozen base)."""

    shape: tuple

    def group(self, g, dtype):
        """Group ``g``'s weight ``[K, N]`` (``[N, K]`` for ``transpose_rhs``) in ``dtype``."""
        raise NotImplementedError


def _group_weight(w, group, dtype):
    """``w[group]`` in ``dtype``. For an array, the barrier keeps XLA:CPU from hoisting its
    bf16->f32 dot upcast out of the loop, which would copy ALL of ``w`` to f32 (a [G, K, N]
    temporary)."""
    if isinstance(w, GroupWeights):
        return w.group(group, dtype)
    w_g = jax.lax.dynamic_index_in_dim(w, group, keepdims=False)
    return jax.lax.optimization_barrier(w_g).astype(dtype)


def _weight_per_group(w, g, dtype):
    """A :class:`GroupWeights` source is materialised once per group (one dequantization per
    expert, live over the group's blocks); an array is read per block, in column chunks
    (:func:`_over_chunks`)."""
    return w.group(g, dtype) if isinstance(w, GroupWeights) else None


CHUNK_ELEMENTS = 1 << 23          # a weight chunk read per block: 32 MiB in fp32


def column_chunks(K: int, N: int) -> tuple[int, int]:
    """``(count, width)``: a ``[K, N]`` weight's ``N`` columns in ``count`` equal chunks of at
    most ``CHUNK_ELEMENTS`` (XLA:CPU copies the slice a dot reads, and a block's ``dw`` product is
    as large: chunks keep both small next to the layer's activations); one chunk when ``N`` has no
    divisor that fits in 16 chunks."""
    for count in range(1, 17):
        if N % count == 0 and K * (N // count) <= CHUNK_ELEMENTS:
            return count, N // count
    return 1, N


def _column_chunks(w, w_g, transpose_rhs) -> tuple[int, int]:
    """:func:`column_chunks` of ``w``; one chunk for a group's materialised weight ``w_g``."""
    K, N = (w.shape[2], w.shape[1]) if transpose_rhs else (w.shape[1], w.shape[2])
    return (1, N) if w_g is not None else column_chunks(K, N)


def _over_chunks(w, w_g, layout, i, transpose_rhs, dtype, carry, fn):
    """``carry = fn(n0, width, w_c, carry)`` for each column chunk ``w_c`` of block ``i``'s
    weight (``[K, width]``, or ``[width, K]`` transposed) from column ``n0``. Several chunks run
    as a loop, so only one chunk (and one ``dw`` product) is ever live."""
    count, width = _column_chunks(w, w_g, transpose_rhs)
    if count == 1:
        w_c = w_g if w_g is not None else _group_weight(w, layout.group_of_block[i], dtype)
        return fn(0, width, w_c, carry)
    K = w.shape[2] if transpose_rhs else w.shape[1]

    def chunk(j, carry):
        n0 = j * width
        start, size = ((layout.group_of_block[i], n0, 0), (1, width, K)) if transpose_rhs else \
            ((layout.group_of_block[i], 0, n0), (1, K, width))
        w_c = jax.lax.optimization_barrier(jax.lax.dynamic_slice(w, start, size))[0]
        return fn(n0, width, w_c.astype(dtype), carry)

    return jax.lax.fori_loop(0, count, chunk, carry)


def _unsigned(index):
    """Unsigned start indices for a read-modify-write of ``dw``: jax then adds no negative-index
    wrapping, which XLA would hoist out of the loop separately for the read and the write; with
    one shared index XLA adds into ``dw`` in place instead of copying the slice first."""
    return tuple(jnp.asarray(v).astype(jnp.uint32) for v in index)


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
def _over_groups(layout, carry, start_group, block, end_group):
    """Nested loops: over the groups holding rows, then over each one's consecutive blocks.

    ``fixed, acc = start_group(g, carry)`` once per used group (fetch its weight, zero an
    accumulator); ``acc, carry = block(i, g, fixed, acc, carry)`` per block ``i`` of the group;
    ``carry = end_group(g, acc, carry)`` after its last block. Both trip counts are dynamic:
    empty groups cost nothing, and the inner loops run ``layout.used_blocks`` times in all."""
    b, nb = layout.block_rows, layout.group_of_block.shape[0]
    blocks_G = layout.padded_sizes_G // b
    starts_G = jnp.cumsum(blocks_G) - blocks_G
    used_U = jnp.nonzero(blocks_G > 0, size=blocks_G.shape[0], fill_value=0)[0]

    def one_group(u, carry):
        g = used_U[u]
        start = jnp.minimum(starts_G[g], nb)
        stop = jnp.minimum(start + blocks_G[g], nb)
        fixed, acc = start_group(g, carry)           # fixed: read by the blocks, not carried
        acc, carry = jax.lax.fori_loop(start, stop, lambda i, ac: block(i, g, fixed, *ac),
                                       (acc, carry))
        return end_group(g, acc, carry)

    return jax.lax.fori_loop(0, jnp.sum(blocks_G > 0), one_group, carry)


def _blocked_forward(x_PK, w, layout, transpose_rhs):
    b = layout.block_rows
    N = w.shape[1] if transpose_rhs else w.shape[2]

    def block(i, g, w_g, acc, y_PN):
        x_bK = jax.lax.dynamic_slice_in_dim(x_PK, i * b, b)

        def columns(n0, width, w_c, y_PN):
            y_bn = _dot(x_bK, w_c, 1 if transpose_rhs else 0).astype(x_PK.dtype)
            return jax.lax.dynamic_update_slice(y_PN, y_bn, (i * b, n0))

        return acc, _over_chunks(w, w_g, layout, i, transpose_rhs, x_PK.dtype, y_PN, columns)

    # tied to the weight: gate and up read the same x, and one shared zero buffer would be
    # copied into each of their loops (an extra [P, N] temporary)
    tie = w if not isinstance(w, GroupWeights) else next(
        a for a in jax.tree.leaves(w) if jnp.issubdtype(a.dtype, jnp.floating))
    return _over_groups(layout, _fresh_zeros((x_PK.shape[0], N), x_PK.dtype, tie),
                        lambda g, _: (_weight_per_group(w, g, x_PK.dtype), None), block,
                        lambda g, acc, y_PN: y_PN)


def _blocked_backward(x_PK, w, layout, g_PN, transpose_rhs, want_dx, want_dw, dtype):
    """``(dx, dw)``; either is None when not wanted (``x_PK`` may then be None: frozen ``w``).

    One pass over the used blocks, group by group. ``dw[g]`` is summed over the group's blocks in
    fp32: in ``dw`` itself for fp32 weights, else in one fp32 ``[K, N]`` accumulator written (in
    ``w``'s dtype) after the group's last block. No ``[G, K, N]`` fp32 buffer either way."""
    b = layout.block_rows
    g_PN = g_PN.astype(dtype)
    P = g_PN.shape[0]
    K = w.shape[2] if transpose_rhs else w.shape[1]
    dx_PK = _fresh_zeros((P, K), dtype, g_PN) if want_dx else None
    dw = _fresh_zeros(w.shape, w.dtype, g_PN) if want_dw else None
    direct = want_dw and w.dtype == jnp.float32      # fp32 weights: add into dw[g] in place

    def start_group(g, carry):
        w_g = _weight_per_group(w, g, dtype) if want_dx else None
        acc = None if not want_dw or direct else _fresh_zeros(w.shape[1:], jnp.float32, g_PN)
        return w_g, acc

    def block(i, g, w_g, acc, carry):
        dx_PK, dw = carry
        g_bN = jax.lax.dynamic_slice_in_dim(g_PN, i * b, b)
        x_bK = jax.lax.dynamic_slice_in_dim(x_PK, i * b, b) if want_dw else None
        gb = layout.group_of_block[i]

        def columns(n0, width, w_c, carry):
            dx_bK, dw, acc = carry
            g_bn = jax.lax.dynamic_slice_in_dim(g_bN, n0, width, axis=1)
            if want_dx:       # dx = g @ w.T   (w [K, N]; or w [N, K] when transposed)
                dx_bK = dx_bK + _dot(g_bn, w_c, 0 if transpose_rhs else 1)
            if want_dw:       # dw[g] += x.T @ g   (or g.T @ x when transposed)
                lhs, rhs = (g_bn, x_bK) if transpose_rhs else (x_bK, g_bn)
                d = jax.lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)
                at = _unsigned((n0, 0) if transpose_rhs else (0, n0))
                if direct:
                    at = _unsigned((gb,)) + at
                    old = jax.lax.dynamic_slice(dw, at, (1, *d.shape))
                    dw = jax.lax.dynamic_update_slice(dw, old + d[None], at)
                else:
                    old = jax.lax.dynamic_slice(acc, at, d.shape)
                    acc = jax.lax.dynamic_update_slice(acc, old + d, at)
            return dx_bK, dw, acc

        dx_bK = jnp.zeros((b, K), jnp.float32) if want_dx else None
        dx_bK, dw, acc = _over_chunks(w, w_g if want_dx else None, layout, i, transpose_rhs,
                                      dtype, (dx_bK, dw, acc), columns)
        if want_dx:
            dx_PK = jax.lax.dynamic_update_slice_in_dim(dx_PK, dx_bK.astype(dtype), i * b, 0)
        return acc, (dx_PK, dw)

    def end_group(g, acc, carry):
        dx_PK, dw = carry
        if want_dw and not direct:
            dw = jax.lax.dynamic_update_index_in_dim(dw, acc.astype(w.dtype)[None], g, 0)
        return dx_PK, dw

    return _over_groups(layout, (dx_PK, dw), start_group, block, end_group)


# ------------------------------------------------------------------------------ ragged_dot path
def _ragged(x_PK, w, layout, transpose_rhs):
    """``ragged_dot`` on the routed rows only: the padded layout is undone (gathers, no FLOPs)
    around it, so the native grouped matmul multiplies M rows, not the P >= M padded ones."""
    w = jnp.swapaxes(w, 1, 2) if transpose_rhs else w
    return layout.pad(jax.lax.ragged_dot(layout.unpad(x_PK), w, layout.sizes_G))


def _ragged_backward(x_PK, w, layout, g_PN, transpose_rhs, want_dx, want_dw, dtype):
    """dx is a ``ragged_dot`` against the transposed weights (native on TPU); dw is not: XLA:TPU
    (jax 0.10.2) computes ``ragged_dot``'s weight transpose densely over all groups (8× the
    FLOPs at E = 8), so dw takes the blocked loop."""
    dx = _ragged(g_PN.astype(dtype), w, layout, not transpose_rhs) if want_dx else None
    dw = (_blocked_backward(x_PK, w, layout, g_PN, transpose_rhs, False, True, dtype)[1]
          if want_dw else None)
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
    x_res = x_PK.value if w.perturbed else None          # x is needed only for dw
    return y, (x_res, w.value, layout, x_PK.perturbed, w.perturbed)


def _gmm_bwd(transpose_rhs, impl, res, g_PN):
    x_PK, w, layout, want_dx, want_dw = res          # g has y's dtype = x's dtype
    kw = dict(transpose_rhs=transpose_rhs, want_dx=want_dx, want_dw=want_dw, dtype=g_PN.dtype)
    dx, dw = _by_platform(impl, functools.partial(_blocked_backward, **kw),
                          functools.partial(_ragged_backward, **kw), x_PK, w, layout, g_PN)
    return dx, dw, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_frozen(x_PK, w, layout, transpose_rhs):
    """A :class:`GroupWeights` source: the blocked loops on every platform (the TPU's native
    ``ragged_dot`` would need all groups' weights at once); gradient to ``x`` only, and only
    ``w`` (not ``x``) kept for the backward."""
    return _blocked_forward(x_PK, w, layout, transpose_rhs)


def _gmm_frozen_fwd(x_PK, w, layout, transpose_rhs):
    return _gmm_frozen(x_PK, w, layout, transpose_rhs), (w, layout)


def _gmm_frozen_bwd(transpose_rhs, res, g_PN):
    w, layout = res
    dx, _ = _blocked_backward(None, w, layout, g_PN, transpose_rhs, True, False, g_PN.dtype)
    return dx, None, None


_gmm_frozen.defvjp(_gmm_frozen_fwd, _gmm_frozen_bwd)


def grouped_matmul(x, w, groups, *, transpose_rhs=False, block_rows=None, implementation="auto"):
    """``ragged_dot(x, w, group_sizes)`` (``w.swapaxes(1, 2)`` with ``transpose_rhs``) whose
    cost follows the rows; differentiable in ``x`` and ``w``. See the module docstring.

    ``w`` is an array ``[G, K, N]`` or a frozen :class:`GroupWeights` source (e.g. QLoRA's nf4
    experts: dequantized one group at a time inside the loop). ``groups`` is either
    ``group_sizes [G]`` (``x [M, K]`` sorted by group; padded and unpadded here) or a
    :class:`BlockLayout` (``x [P, K]`` already in that padded layout; so is the result)."""
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown grouped_matmul implementation {implementation!r}; "
                         f"choose one of {_IMPLEMENTATIONS}")
    G = w.shape[0]
    padded = isinstance(groups, BlockLayout)
    sizes_shape = groups.padded_sizes_G.shape if padded else groups.shape
    if x.ndim != 2 or len(w.shape) != 3 or sizes_shape != (G,):
        raise ValueError(f"grouped_matmul: x [M, K], w [G, K, N], groups [G]; got {x.shape}, "
                         f"{tuple(w.shape)}, {sizes_shape}")
    K = w.shape[2] if transpose_rhs else w.shape[1]
    if x.shape[1] != K:
        raise ValueError(f"grouped_matmul: x has {x.shape[1]} columns, w contracts {K}")
    if isinstance(w, GroupWeights):
        def matmul(x_PK, layout):
            return _gmm_frozen(x_PK, w, layout, bool(transpose_rhs))
    else:
        w = w.astype(x.dtype)

        def matmul(x_PK, layout):
            return _gmm(x_PK, w, layout, bool(transpose_rhs), implementation)
    if padded:
        return matmul(x, groups)
    layout = block_layout(groups, x.shape[0], block_rows)
    return layout.unpad(matmul(layout.pad(x), layout))
