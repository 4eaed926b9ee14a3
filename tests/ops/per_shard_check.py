"""Run with 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8): the Pallas kernel
run per device shard (rows over data x fsdp, heads over tensor) equals the reference, output
and gradients. Prints the largest relative error."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from medjax.ops import attention, attention_reference
from medjax.train.step import on_mesh

from attention_checks import random_qkv, rel_err

mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2, 1), ("data", "fsdp", "tensor", "expert"),
            axis_types=(AxisType.Auto,) * 4)
q, k, v, ct = random_qkv(0, 4, 40, 40, 4, 2, 16, jnp.float32)
seg = jnp.asarray(np.repeat([[1] * 25 + [2] * 10 + [0] * 5], 4, 0), jnp.int32)
kw = dict(causal=True, sliding_window=12, segment_ids=seg)


def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * ct)


pallas = lambda q, k, v: attention(q, k, v, implementation="pallas", **kw)  # noqa: E731
ref = lambda q, k, v: attention_reference(q, k, v, **kw)  # noqa: E731
rows = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
step = jax.jit(on_mesh(mesh, lambda q, k, v: (pallas(q, k, v), *jax.grad(loss(pallas), (0, 1, 2))(q, k, v))),
               in_shardings=(rows,) * 3)
text = step.lower(q, k, v).as_text()
assert "shard_map" in text or "manual" in text, "kernel not run per shard"
got = step(q, k, v)
want = (ref(q, k, v), *jax.grad(loss(ref), (0, 1, 2))(q, k, v))
print(max(rel_err(g, w) for g, w in zip(got, want)))
