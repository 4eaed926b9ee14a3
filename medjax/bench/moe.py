"""MoE benchmark: ``python -m medjax.bench moe [--tokens 1024] [--hidden 1024] [--ffn 3584] ...``.

Forward + backward of one Mixtral MoE layer (gradients for the input and every weight) in
``--dtype``, median of ``--steps`` timed calls after a warm-up, all in the same run (on a GPU
when there is one, torch's included):

* ``dense``: the same active work as plain matmuls: a SwiGLU over ``tokens · k`` rows with one
  expert's weights (the floor a grouped matmul can reach);
* ``grouped_matmul`` / ``ragged_dot``: the experts' SwiGLU over the routed rows (sorted by
  expert, random routing) through ``medjax.ops.grouped_matmul`` and through
  ``jax.lax.ragged_dot`` (which XLA:CPU/GPU compute densely over all experts);
* ``medjax SparseMoE``: the whole layer (router, top-k, dispatch, experts, combine);
* ``transformers Mixtral``: ``MixtralSparseMoeBlock`` of the same shape, in a fresh process
  (a loaded JAX runtime slows torch down), torch's own threads.

``x dense`` is each row's time over the dense row's. FLOPs counted: 3 × forward (backward = 2×).

``--tpu-compile v5p:2x2x1`` instead compiles one Mixtral-8x7B layer (bf16, 2048 tokens, fwd+bwd)
for a compile-only TPU device (needs ``jax[tpu]`` and ``TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu``;
docs/SCALE.md) and prints its compiled FLOPs over the active FLOPs. XLA counts a loop body once:
the dw loops' bodies (one ``[b, K] x [b, width]`` product per block and weight column chunk) are added
for the remaining trips.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def _median_time(fn, *args, steps):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _swiglu_grad(matmul):
    def loss(x, wg, wu, wd):
        return jnp.sum(matmul(jax.nn.silu(matmul(x, wg)) * matmul(x, wu), wd))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def bench_jax(args) -> list[dict]:
    from flax import nnx

    from medjax.models import ModelConfig
    from medjax.models.moe import SparseMoE
    from medjax.ops.grouped_matmul import grouped_matmul
    T, H, I, E, k = args.tokens, args.hidden, args.ffn, args.experts, args.top_k
    dt = jnp.dtype(args.dtype)
    rows = T * k
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (rows, H), dt)
    wg, wu = ((0.02 * jax.random.normal(kk, (E, H, I))).astype(dt) for kk in keys[1:3])
    wd = (0.02 * jax.random.normal(keys[3], (E, I, H))).astype(dt)
    experts = jnp.sort(jax.random.randint(keys[4], (rows,), 0, E))
    gs = jnp.bincount(experts, length=E).astype(jnp.int32)
    out = []
    dense = _median_time(_swiglu_grad(lambda a, w: a @ w[0]), x, wg[:1], wu[:1], wd[:1],
                         steps=args.steps)
    out.append({"name": "dense (same active work)", "s": dense})
    for name, mm in [("grouped_matmul", lambda a, w: grouped_matmul(a, w, gs)),
                     ("ragged_dot", lambda a, w: jax.lax.ragged_dot(a, w, gs))]:
        out.append({"name": name, "s": _median_time(_swiglu_grad(mm), x, wg, wu, wd,
                                                     steps=args.steps)})
    cfg = ModelConfig(architecture="mixtral", vocab_size=32, hidden_size=H, intermediate_size=I,
                      num_layers=1, num_heads=8, num_kv_heads=8, num_experts=E,
                      num_experts_per_tok=k)
    graph, state = nnx.split(SparseMoE(cfg, rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt))

    def layer_loss(state, x):
        y, _ = nnx.merge(graph, state)(x)
        return jnp.sum(y.astype(jnp.float32))

    xt = jax.random.normal(keys[0], (1, T, H), dt)
    out.append({"name": "medjax SparseMoE", "s": _median_time(
        jax.jit(jax.grad(layer_loss, argnums=(0, 1))), state, xt, steps=args.steps)})
    return out


def bench_transformers(args: dict) -> dict:
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=args["hidden"], intermediate_size=args["ffn"],
                        num_local_experts=args["experts"], num_experts_per_tok=args["top_k"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args["dtype"])
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    block.to(device, dtype)
    x = torch.randn(1, args["tokens"], args["hidden"], device=device, dtype=dtype, requires_grad=True)

    def step():
        out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(args["steps"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"name": "transformers Mixtral", "s": float(np.median(times)),
            "threads": torch.get_num_threads()}


def tpu_compile(topology: str, tokens: int = 2048) -> int:
    from flax import nnx

    from medjax.models import get_preset
    from medjax.models.moe import SparseMoE, moe_layer_cost
    from medjax.ops.grouped_matmul import column_chunks
    from medjax.ops.pallas.tpu_compile import topology_devices
    device = topology_devices(topology)[0]
    cfg = get_preset("mixtral-8x7b")
    moe = nnx.eval_shape(lambda: SparseMoE(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                           param_dtype=jnp.bfloat16))
    graph, state = nnx.split(moe)
    on = jax.sharding.SingleDeviceSharding(device)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on), state)

    def loss(state, x):
        y, stats = nnx.merge(graph, state)(x)
        return jnp.sum(y.astype(jnp.float32)) + stats[0]

    x = jax.ShapeDtypeStruct((1, tokens, cfg.hidden_size), jnp.bfloat16, sharding=on)
    compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(state, x).compile()
    cost = moe_layer_cost(cfg, tokens)
    # XLA counts each loop body once. The dw of each projection is the blocked loop: per block
    # and column chunk one [b, K] x [b, width] product; add its remaining trips (worst-case
    # routing: every padded row) for gate/up (K=H, N=I) and down (K=I, N=H).
    b, H, I = cost["block_rows"], cfg.hidden_size, cfg.intermediate_size
    dw_total = 2 * cost["padded_rows"] * H * I
    missing = sum(dw_total - 2 * b * K * column_chunks(K, N)[1]
                  for K, N in ((H, I), (H, I), (I, H)))
    flops = compiled.cost_analysis()["flops"] + missing
    print(f"{device.device_kind} · Mixtral-8x7B MoE layer fwd+bwd · {tokens} tokens · bf16\n"
          f"compiled {flops / 1e12:.3f} TFLOP (3 dw loops over {cost['padded_rows']} worst-case "
          f"padded rows in {b}-row blocks) / active {cost['active_flops'] / 1e12:.3f} = "
          f"{flops / cost['active_flops']:.3f}; temporaries "
          f"{compiled.memory_analysis().temp_size_in_bytes / 2**30:.2f} GiB")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medjax.bench moe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=3584)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--no-transformers", action="store_true", help="skip the torch row")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--tpu-compile", metavar="TOPOLOGY", help="compile for a TPU (see above)")
    args = p.parse_args(argv)
    if args.tpu_compile:
        return tpu_compile(args.tpu_compile)
    rows = bench_jax(args)
    if not args.no_transformers:
        from medjax.bench.train import isolated
        rows.append(isolated(bench_transformers, vars(args)))
    active = 3 * 3 * 2 * args.tokens * args.top_k * args.hidden * args.ffn
    dense = rows[0]["s"]
    print(f"MoE layer fwd+bwd · {args.tokens} tokens · hidden {args.hidden} · ffn {args.ffn} · "
          f"{args.experts} experts top-{args.top_k} · {jax.devices()[0].device_kind} · "
          f"active {active / 1e9:.1f} GFLOP")
    print(f"{'':28s} {'time s':>8s} {'GFLOP/s':>8s} {'x dense':>8s}")
    for r in rows:
        print(f"{r['name']:28s} {r['s']:8.3f} {active / r['s'] / 1e9:8.1f} {r['s'] / dense:8.2f}")
    if args.json:
        from medjax.outputs import write_file
        write_file(args.json, json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0
