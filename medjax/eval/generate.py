"""KV-cache text generation: batched prompts of different lengths, greedy or sampled.

Prompts are right-padded to a bucket length P and prefilled in one forward that fills the
cache (slot == position). Row b's next token goes at its own position ``len_b``: it
overwrites the padding slot there and attends causally to slots ``<= len_b`` only, so the
padding is never seen. Each further token is one call of a single jitted decode step with
fixed shapes (cache ``[L, B, P + max_new, Hkv, D]``), so nothing recompiles per token.

Sampling follows transformers' order: temperature → top-k → top-p; temperature 0 = greedy.
Med42's card: ``temperature=0.4, top_k=150, top_p=0.75``.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from medjax.errors import ConfigError
from medjax.ops.target import compiler_options
from medjax.eval.scorer import bucket, mesh_of, traced_for


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0        # 0 → greedy
    top_k: int = 0                  # 0 → off
    top_p: float = 1.0              # 1 → off

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top-p must be in (0, 1], got {self.top_p}")


MED42_SAMPLING = SamplingParams(temperature=0.4, top_k=150, top_p=0.75)


def top_k_filter(logits_BV, k):
    """Logits below each row's k-th largest set to -inf; ``k`` an int or ``[B, 1]`` (0 = off)."""
    V = logits_BV.shape[-1]
    if isinstance(k, int):
        kth_B1 = jax.lax.top_k(logits_BV, min(k, V))[0][:, -1:]
    else:
        sorted_BV = -jnp.sort(-logits_BV, axis=-1)                      # descending
        kth_B1 = jnp.take_along_axis(sorted_BV, jnp.clip(k - 1, 0, V - 1), axis=-1)
        kth_B1 = jnp.where(k > 0, kth_B1, -jnp.inf)
    return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def top_p_filter(logits_BV, p):
    """Drop the low tail whose total probability is <= 1 - p (always keep the top token);
    ``p`` a float or ``[B, 1]`` (1 = off)."""
    sorted_BV = jnp.sort(logits_BV, axis=-1)                           # ascending
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    cut_BV = cum_BV <= 1.0 - p
    cut_BV = cut_BV.at[:, -1].set(False)
    threshold_B1 = jnp.max(jnp.where(cut_BV, sorted_BV, -jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV <= threshold_B1, -jnp.inf, logits_BV)


def sample_logits(logits_BV, key, params: SamplingParams):
    """Next token ids ``[B]`` from fp32 logits."""
    if params.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / params.temperature
    if params.top_k > 0:
        logits_BV = top_k_filter(logits_BV, params.top_k)
    if params.top_p < 1.0:
        logits_BV = top_p_filter(logits_BV, params.top_p)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def sample_rows(logits_BV, keys_B, temperature_B, top_k_B, top_p_B):
    """Next token ids ``[B]`` with each row's own sampling parameters and PRNG key (the serving
    engine's batch mixes requests); rows with temperature 0 are greedy. Same filters and order
    as :func:`sample_logits`."""
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def sampled():
        t_B1 = jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
        filtered = top_k_filter(logits_BV / t_B1, top_k_B[:, None])
        filtered = top_p_filter(filtered, top_p_B[:, None])
        drawn = jax.vmap(lambda k, x: jax.random.categorical(k, x))(keys_B, filtered)
        return jnp.where(temperature_B > 0, drawn.astype(jnp.int32), greedy_B)
    return jax.lax.cond(jnp.any(temperature_B > 0), sampled, lambda: greedy_B)


def _prefill(graphdef, params, state, ids_BP, lengths_B, cache, key):
    model = nnx.merge(graphdef, state)
    out = model.forward(ids_BP, cache=cache)
    last_BV = out.logits[jnp.arange(ids_BP.shape[0]), lengths_B - 1]
    return sample_logits(last_BV, key, params), out.cache, last_BV


def _decode_step(graphdef, params, state, tokens_B, positions_B, cache, key):
    model = nnx.merge(graphdef, state)
    out = model.forward(tokens_B[:, None], positions=positions_B[:, None], cache=cache)
    logits_BV = out.logits[:, 0]
    return sample_logits(logits_BV, key, params), out.cache, logits_BV


class Generator:
    """Compiled prefill + decode step for one model; reuse it across calls."""

    def __init__(self, model, params: SamplingParams = SamplingParams()):
        self.model = model
        graphdef, self.state = nnx.split(model)
        self.params = params
        options = compiler_options(self.state)
        mesh = mesh_of(self.state) if getattr(model, "pipeline_stages", 1) > 1 else None
        self._prefill = jax.jit(traced_for(model, mesh, partial(_prefill, graphdef, params)),
                                compiler_options=options)
        self._step = jax.jit(traced_for(model, mesh, partial(_decode_step, graphdef, params)),
                             donate_argnums=(3,), compiler_options=options)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                 stop_ids: Sequence[int] = (), seed: int = 0, pad_id: int = 0,
                 on_step: Callable[[np.ndarray], None] | None = None,
                 return_logits: bool = False):
        """New token ids per prompt (stop token included when hit). With ``return_logits``
        also the ``[steps, B, V]`` logits each token was chosen from."""
        B = len(prompts)
        lengths = np.array([len(p) for p in prompts], np.int32)
        if lengths.min() < 1:
            raise ConfigError("every prompt needs at least one token (an empty --prompt without BOS?)")
        P = bucket(int(lengths.max()))
        ids_BP = np.full((B, P), pad_id, np.int32)
        for b, p in enumerate(prompts):
            ids_BP[b, : len(p)] = p
        cache = self.model.init_cache(B, P + max_new_tokens)
        key = jax.random.key(seed)
        key, sub = jax.random.split(key)
        tokens_B, cache, logits_BV = self._prefill(self.state, jnp.asarray(ids_BP),
                                                  jnp.asarray(lengths), cache, sub)
        stop = np.array(sorted(set(stop_ids)), np.int32)
        out = [[] for _ in range(B)]
        done = np.zeros(B, bool)
        all_logits = []
        positions_B = lengths.copy()
        for step in range(max_new_tokens):
            host_tokens = np.asarray(tokens_B)
            if return_logits:
                all_logits.append(np.asarray(logits_BV))
            for b in np.flatnonzero(~done):
                out[b].append(int(host_tokens[b]))
            done |= np.isin(host_tokens, stop)
            if on_step is not None:
                on_step(host_tokens)
            if done.all() or step == max_new_tokens - 1:
                break
            key, sub = jax.random.split(key)
            tokens_B, cache, logits_BV = self._step(self.state, tokens_B, jnp.asarray(positions_B),
                                                    cache, sub)
            positions_B = positions_B + 1
        return (out, np.stack(all_logits)) if return_logits else out


class TextStreamer:
    """Prints row 0's new text as tokens arrive (decodes the whole tail to keep UTF-8 intact)."""

    def __init__(self, tokenizer, stop_ids: Sequence[int] = (), stream=None):
        # None = the sys.stdout of the moment, not the one bound when this module was imported
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.stream = stream if stream is not None else sys.stdout
        self.ids: list[int] = []
        self.printed = 0
        self.finished = False

    def __call__(self, tokens_B) -> None:
        if self.finished:
            return
        token = int(tokens_B[0])
        if token in self.stop_ids:
            self.finished = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.stream.write(text[self.printed:])
            self.stream.flush()
            self.printed = len(text)


def strip_stop(ids: list[int], stop_ids: Sequence[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in set(stop_ids) else ids


# ----------------------------------------------------------------------------- generation eval
def extract_choice(text: str, choices: Sequence[str]) -> int:
    """Index of the first choice named in ``text`` (a standalone letter or word), else -1."""
    alternatives = "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))
    match = re.search(rf"(?<![A-Za-z])({alternatives})(?![A-Za-z])", text.strip(),
                      flags=0 if all(len(c) == 1 for c in choices) else re.IGNORECASE)
    if not match:
        return -1
    lowered = [c.lower() for c in choices]
    return lowered.index(match.group(1).lower())


def answer_by_generation(model, tokenizer, items, *, max_new_tokens: int = 32, batch_size: int = 8,
                         desc: str = "generating") -> None:
    """Greedy answer for each item's prompt; sets ``item.generation`` and ``item.generated_pred``."""
    from medjax.eval.requests import LmEvalEncoder

    encoder = LmEvalEncoder(tokenizer, max_length=model.config.max_position_embeddings)
    generator = Generator(model)
    order = sorted(range(len(items)), key=lambda i: -len(items[i].context))
    bar = tqdm(total=len(items), desc=desc, unit="item")
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start:start + batch_size]]
        prompts = [encoder.encode(it.context) for it in chunk]
        prompts += [prompts[-1]] * (batch_size - len(chunk))     # fixed batch shape
        outs = generator.generate(prompts, max_new_tokens=max_new_tokens,
                                  stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
        for it, ids in zip(chunk, outs):
            it.generation = tokenizer.decode(strip_stop(ids, tokenizer.stop_ids))
            it.generated_pred = extract_choice(it.generation, it.choice_texts)
        bar.update(len(chunk))
    bar.close()
