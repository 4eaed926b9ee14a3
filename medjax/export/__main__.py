"""``python -m medjax.export --checkpoint DIR --out DIR [--merge-lora | --peft]``.

Rebuilds a trained model from a run's checkpoint directory (``<run>/checkpoints``; the run
config is stored in each checkpoint) and writes either an HF directory that ``transformers``
loads (full fine-tunes as they are; LoRA runs with the adapters merged: ``--merge-lora``,
the default) or a PEFT adapter directory (``--peft``: ``adapter_config.json`` +
``adapter_model.safetensors`` for ``peft.PeftModel.from_pretrained`` on the HF base), or with
``--gguf TYPE`` one GGUF file at ``--out`` for llama.cpp (TYPE: f32, f16, q8_0, q4_0, q4_1;
LoRA adapters merged first).

Under ``launch/local_multiprocess.sh`` (or any multi-process launch) every process restores its
shards and takes part in gathering each tensor; process 0 alone writes the files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medjax.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a run's checkpoint directory (or the run directory containing checkpoints/)")
    p.add_argument("--out", required=True,
                   help="output directory (created; must be empty or absent unless --overwrite); with "
                        "--gguf the .gguf file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (the new export is written beside it and renamed "
                        "over it only when complete)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--merge-lora", action="store_true", help="merged HF model (default)")
    kind.add_argument("--peft", action="store_true", help="PEFT adapter only (LoRA runs)")
    kind.add_argument("--gguf", metavar="TYPE", choices=("f32", "f16", "q8_0", "q4_0", "q4_1"),
                      help="one GGUF file at --out (llama.cpp), weights as TYPE: f32, f16, q8_0, q4_0 "
                           "or q4_1 (norms and the MoE router stay f32)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest readable)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the exported HF weights")
    p.add_argument("mesh", nargs="*", metavar="mesh.key=value",
                   help="lay the model out on another mesh than the run's, e.g. mesh.preset=fsdp "
                        "mesh.fsdp=4 (default: the run's own mesh section)")
    args = p.parse_args(argv)

    from medjax.config import ConfigError, mesh_overrides
    from medjax.distributed import initialize
    # under launch/*: jax.distributed from the environment (or mesh.coordinator=...); no-op alone
    initialize(mesh_overrides(args.mesh))
    from medjax.loading import checkpoint_dir, load_run
    from medjax.paths import separate_output
    ckpt = checkpoint_dir(args.checkpoint)     # CheckpointError: no such directory / not a run
    separate_output(args.out, ckpt)
    out_path = Path(args.out)
    if not args.overwrite and (out_path.is_file() or out_path.is_dir() and any(out_path.iterdir())):
        raise ConfigError(f"--out {out_path} exists{'' if out_path.is_file() else ' and is not empty'}: "
                          f"pass --overwrite to replace it, or choose another --out")
    run = load_run(ckpt, args.step, args.mesh)
    model, tokenizer, cfg, step = run.model, run.tokenizer, run.config, run.step
    if args.peft and not cfg.lora.enabled:
        raise ConfigError(f"--peft needs a LoRA run (lora.enabled=true); {ckpt} is a full fine-tune")
    if args.peft:
        from medjax.hf.peft_export import save_peft
        out = save_peft(model, args.out, base_model_name_or_path=cfg.model.path)
    else:
        from medjax.hf.export import save_hf
        from medjax.hf.gguf_export import save_gguf
        from medjax.train.setup import plain_model
        plain = plain_model(model, keep=False)    # QLoRA: adapters merged onto the dequantized base
        if args.gguf:
            out = save_gguf(plain, args.out, tokenizer=tokenizer, type=args.gguf)
        else:
            out = save_hf(plain, args.out, tokenizer=tokenizer, dtype=args.dtype, overwrite=args.overwrite)
    from medjax.distributed import is_main_process
    if is_main_process():              # process 0 wrote the files; it alone says so
        print(f"exported step {step} of {ckpt} to {out}")
    return 0


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
