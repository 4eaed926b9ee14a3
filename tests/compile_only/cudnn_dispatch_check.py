"""Run in the CUDA venv (``make cuda-venv``): a tiny model's causal call compiled for one
compile-only H100 contains cuDNN's flash-attention fusion; a training-shaped call (right-padded
segment ids and positions) holds cuDNN and the Triton kernel for packed rows. Prints one JSON line.
"""
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from medjax.models import Decoder, get_preset  # noqa: E402
from medjax.plan.compile import _kernel_counts, compile_devices  # noqa: E402


def main():
    _, devices = compile_devices("h100", 1)
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    model = nnx.eval_shape(lambda: Decoder(get_preset("tiny-llama2"), rngs=nnx.Rngs(0),
                                           dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
    ids = jax.ShapeDtypeStruct((2, 128), jnp.int32, sharding=sharding)

    def causal(state, ids):
        return nnx.merge(graphdef, state)(ids)

    def training_shaped(state, ids, positions, segment_ids):
        return nnx.merge(graphdef, state)(ids, positions=positions, segment_ids=segment_ids)

    out = {}
    out["causal"] = _kernel_counts(jax.jit(causal).lower(state, ids).compile().as_text())
    out["training"] = _kernel_counts(
        jax.jit(training_shaped).lower(state, ids, ids, ids).compile().as_text())
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
