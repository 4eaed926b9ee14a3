"""Run in the CUDA venv (``make cuda-venv``): the serving decode attention compiled for one
compile-only H100. ``ops.paged_attention(implementation="auto")`` at Llama-3-8B's attention
shapes (bf16, Hq/Hkv = 32/8, D = 128, pages of 16, tables 256 pages wide; also its "xla"
implementation, and fp32 with 4 query tokens and a sliding window) and the serving
engine's decode step (tiny-llama2, 2 layers) are compiled by XLA's GPU pipeline (Triton
included). Prints one JSON line per program: Pallas Triton calls, ``while`` loops (the XLA path's
page loop is one) and mentions of the kernel's name (``medjax_paged_decode``).
"""
import json
import os
import re
import sys
from functools import partial

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from medjax.models import Decoder, get_preset  # noqa: E402
from medjax.ops.paged_attention import paged_attention  # noqa: E402
from medjax.plan.compile import _kernel_counts, compile_devices  # noqa: E402
from medjax.serve import engine  # noqa: E402


def _summary(compiled):
    text = compiled.as_text()
    return {"triton": _kernel_counts(text)["triton"],
            "while": len(re.findall(r"\bwhile\(", text)),
            "paged_kernels": len(re.findall(r"medjax_paged_decode", text))}


def main():
    _, devices = compile_devices("h100", 1)
    on_gpu = jax.sharding.SingleDeviceSharding(devices[0])
    S = partial(jax.ShapeDtypeStruct, sharding=on_gpu)

    B, Hq, Hkv, D, N, page, P = 16, 32, 8, 128, 2048, 16, 256
    attn_args = [S((B, 1, Hq, D), jnp.bfloat16), S((N, Hkv, page, D), jnp.bfloat16),
                 S((N, Hkv, page, D), jnp.bfloat16), S((B, P), jnp.int32), S((B,), jnp.int32)]
    out = {"attention": _summary(jax.jit(paged_attention).lower(*attn_args).compile())}
    xla = partial(paged_attention, implementation="xla")
    out["attention_xla"] = _summary(jax.jit(xla).lower(*attn_args).compile())
    # fp32 (full-precision dots), 4 draft tokens per sequence, a sliding window
    T = 4
    f32_args = [S((B, T, Hq, D), jnp.float32), S((N, Hkv, page, D), jnp.float32),
                S((N, Hkv, page, D), jnp.float32), S((B, P), jnp.int32), S((B,), jnp.int32),
                S((B, T), jnp.int32)]
    windowed = lambda q, k, v, t, n, pos: paged_attention(q, k, v, t, n, q_positions=pos,  # noqa
                                                          sliding_window=1024)
    out["attention_fp32_T4_window"] = _summary(jax.jit(windowed).lower(*f32_args).compile())

    cfg = get_preset("tiny-llama2")
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                           param_dtype=jnp.bfloat16))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: S(x.shape, x.dtype), state)
    rows, pages, width = 8, 64, 32
    pool = S((pages, cfg.num_kv_heads, page, cfg.head_dim), jnp.bfloat16)
    pools = tuple(pool for _ in range(cfg.num_layers))
    i32 = S((rows,), jnp.int32)
    sampling = (S((rows,), jnp.float32), i32, S((rows,), jnp.float32), S((rows,), jnp.uint32),
                i32, i32)
    step = jax.jit(partial(engine._decode, graphdef), donate_argnums=(1, 2))
    compiled = step.lower(state, pools, pools, i32, i32, i32, S((rows, width), jnp.int32),
                          sampling).compile()
    out["decode_step"] = _summary(compiled) | {"layers": cfg.num_layers,
                                               "head_dim": cfg.head_dim}
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
