"""Import straight into a sharding: every device block reads only its rows; logits unchanged."""
import subprocess
import sys

from hf_fixtures import make_tiny_hf

CHILD = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import medjax
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))

def shardings(path, shape):
    # shard the last dim over "model" and the first over "data" where divisible
    spec = [None] * len(shape)
    if len(shape) >= 2 and shape[-1] % 4 == 0:
        spec[-1] = "model"
    if len(shape) >= 2 and shape[0] % 2 == 0:
        spec[0] = "data"
    return NamedSharding(mesh, P(*spec))

ref, _ = medjax.load(sys.argv[1], progress=False)
sharded, _ = medjax.load(sys.argv[1], shardings=shardings, progress=False)
q = sharded.model.layers[0].self_attn.q_proj.kernel[...]
assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape == (32, 16), q.sharding
ids = jnp.arange(20)[None] % 256
from flax import nnx
for (path, a), b in zip(nnx.to_flat_state(nnx.state(ref)), nnx.to_flat_state(nnx.state(sharded)).leaves):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
# sharded matmuls reduce in another order: equal to float tolerance, not bit-identical
np.testing.assert_allclose(np.asarray(ref(ids)), np.asarray(sharded(ids)), atol=1e-5)
print("ok")
"""


def test_import_into_shardings(tmp_path):
    for family in ("llama2", "mixtral"):
        d = make_tiny_hf(family, tmp_path / family, seed=4)
        out = subprocess.run([sys.executable, "-c", CHILD, str(d)], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
