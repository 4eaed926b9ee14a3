"""One process of the 2-process × 4-CPU-device check (run by launch/local_multiprocess.sh).

    python -m tests.distributed.multiprocess_worker --out DIR --name NAME --start S --stop E
        [--restore CKPT] [--save CKPT] [--export DIR]

Trains tiny-llama with the fsdp preset over ALL devices of all processes for steps
[S, E) of a fixed batch sequence; each process feeds only its own rows of every global batch.
Writes DIR/NAME.p{I}.json with the losses and the batch rows this process read.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from medjax import distributed

distributed.initialize()            # before anything touches a device

import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402

from medjax import sharding  # noqa: E402
from medjax.config import MeshSection  # noqa: E402
from medjax.models import get_preset  # noqa: E402
from tests.distributed import common  # noqa: E402

MODEL, BATCH, TOTAL_STEPS = "tiny-llama", 8, 6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--start", type=int, required=True)
    ap.add_argument("--stop", type=int, required=True)
    ap.add_argument("--restore")
    ap.add_argument("--save")
    ap.add_argument("--export", help="HF directory: every process joins the gather of the "
                                     "sharded model, process 0 writes it")
    args = ap.parse_args()
    assert jax.process_count() == int(os.environ["MEDJAX_NUM_PROCESSES"]), jax.process_count()

    mesh = sharding.make_mesh(MeshSection(preset="fsdp"))
    rules = sharding.rules_for("fsdp")
    graphdef, state = common.build(MODEL)
    state_sh = sharding.param_shardings(state, mesh, rules)
    checkpointer = ocp.StandardCheckpointer()
    if args.restore:
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              nnx.to_pure_dict(state), nnx.to_pure_dict(state_sh))
        restored = checkpointer.restore(Path(args.restore).absolute(), target)
        nnx.replace_by_pure_dict(state, restored)
        state = sharding.place(state, state_sh)
    else:
        state = sharding.place(state, state_sh)

    step = common.jit_step(graphdef, state_sh, sharding.batch_sharding(mesh))
    rows = sharding.local_batch_rows(mesh, BATCH)
    all_batches = common.batches(TOTAL_STEPS, BATCH, get_preset(MODEL).vocab_size)
    losses, read = [], []
    for i in range(args.start, args.stop):
        local = all_batches[i][rows]                       # only this process's rows
        state, loss = step(state, sharding.global_batch(local, mesh))
        losses.append(float(loss))
        read.append([i, rows.start, rows.stop, local[:, 0].tolist()])
    if args.save:
        checkpointer.save(Path(args.save).absolute(), nnx.to_pure_dict(state))
        checkpointer.wait_until_finished()
    if args.export:
        import medjax
        model, _ = nnx.merge(graphdef, state)
        medjax.save_hf(model, args.export)
    sample = state[0]["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value()
    record = {"losses": losses, "rows": read, "process": jax.process_index(),
              "devices": jax.device_count(), "local_devices": jax.local_device_count(),
              "q_proj_spec": str(sample.sharding.spec),
              "q_proj_local_shards": len(sample.addressable_shards)}
    out = Path(args.out) / f"{args.name}.p{jax.process_index()}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.rename(out)


if __name__ == "__main__":
    main()
