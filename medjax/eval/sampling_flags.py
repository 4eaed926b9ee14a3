"""The sampling options of every CLI that generates text (``medjax.generate``, ``medjax.arena``):
one definition, added to each parser, read back into :class:`~medjax.eval.generate.SamplingParams`.

Nothing here imports jax, so ``--help`` stays instant."""
from __future__ import annotations

from medjax.errors import ConfigError


def add_sampling_flags(parser, *, seed_note: str = "") -> None:
    """``--max-new-tokens --temperature --top-k --top-p --med42-sampling --seed`` on ``parser``
    (an ``ArgumentParser`` or an argument group); ``seed_note`` adds to ``--seed``'s help."""
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="stop after this many generated tokens if no stop token came first "
                             "(default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off (default)")
    parser.add_argument("--med42-sampling", action="store_true",
                        help="Med42's card: T=0.4, top-k 150, top-p 0.75 (replaces the three above)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the sampler; the same seed gives the same text "
                             f"(default: %(default)s; unused when greedy){seed_note}")


def sampling_from(args):
    """``SamplingParams`` of the parsed flags (ConfigError names a bad one)."""
    from medjax.eval.generate import MED42_SAMPLING, SamplingParams
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.med42_sampling:
        return MED42_SAMPLING
    return SamplingParams(args.temperature, args.top_k, args.top_p)
