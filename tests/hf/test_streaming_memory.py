"""Importing a ~1 GB checkpoint streams: peak host RSS stays below 1.5x the checkpoint size."""
import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from medjax.models import ModelConfig, abstract_decoder

CFG = ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=20,
                  num_heads=16, num_kv_heads=4)

# VmHWM (this process image's peak RSS), not ru_maxrss: Linux carries ru_maxrss across exec, so a
# child forked from a big pytest process would report the parent's footprint.
CHILD = """
import re, sys, time
import medjax
from medjax.hf.load import checkpoint_nbytes
t = time.time()
model, _ = medjax.load(sys.argv[1], progress=False)
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(peak, checkpoint_nbytes(sys.argv[1]), time.time() - t)
"""


def _write_checkpoint(out):
    from flax import nnx
    from medjax.hf.names import export_tensors
    flat = dict(nnx.to_flat_state(nnx.state(abstract_decoder(CFG), nnx.Param)))
    rng = np.random.default_rng(0)
    tensors = dict(export_tensors(CFG, lambda p, index=(): rng.standard_normal(
        flat[p].get_value().shape[len(index):], dtype=np.float32) * 0.02))
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(CFG.to_hf_config()))


@pytest.mark.slow
def test_peak_rss_below_one_and_a_half_checkpoints(tmp_path):
    _write_checkpoint(tmp_path)
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout.split()
    peak, size, seconds = int(out[0]), int(out[1]), float(out[2])
    print(f"checkpoint {size / 2**30:.2f} GiB, peak RSS {peak / 2**30:.2f} GiB "
          f"({peak / size:.2f}x), load {seconds:.1f}s")
    assert size > 0.9e9
    assert peak < 1.5 * size, (peak, size)
