"""sentencepiece → ``tokenizers``: a ``tokenizer.model`` (or GGUF ``llama`` tokens + scores) as the
BPE/Unigram backend ``transformers`` builds for Llama/Mistral.

BPE pieces with byte fallback, merges recovered from the piece scores (a merge ranks by the score
of the piece it produces), ``Metaspace`` pre-tokenizer; Unigram models become a ``tokenizers``
Unigram model with the same scores. Piece types are sentencepiece's (GGUF stores the same ids).
"""
from __future__ import annotations

from typing import Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers
from tokenizers import Tokenizer as BackendTokenizer

from medjax.errors import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def from_sentencepiece(model_bytes: bytes, source: str):
    """Convert a sentencepiece ModelProto into a ``tokenizers`` backend (+ default specials)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_bytes)
    except Exception as e:
        raise CheckpointError(f"{source}: not a sentencepiece model: {e}") from None
    pieces = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    kind = {1: "unigram", 2: "bpe"}.get(trainer.model_type)
    if kind is None:
        raise CheckpointError(f"{source}: sentencepiece model_type {trainer.model_type} is not supported "
                             "(only unigram and bpe)")
    backend = sentencepiece_backend(
        pieces, scores, types, kind=kind, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback,
        add_prefix_space=norm.add_dummy_prefix, charsmap=norm.precompiled_charsmap,
        collapse_whitespace=norm.remove_extra_whitespaces)

    def piece(i):
        return pieces[i] if 0 <= i < len(pieces) else None
    defaults = dict(bos_token=piece(trainer.bos_id), eos_token=piece(trainer.eos_id),
                    unk_token=piece(trainer.unk_id), pad_token=piece(trainer.pad_id),
                    add_bos_token=trainer.bos_id >= 0)
    return backend, defaults


def merges_from_scores(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int]):
    """BPE merges implied by a scored vocabulary: a merge ranks by the score of its result."""
    vocab = {p: i for i, p in enumerate(pieces)}
    ranked = []
    for piece, score, kind in zip(pieces, scores, types):
        if kind not in (NORMAL, USER_DEFINED) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_backend(pieces, scores, types, *, kind="bpe", unk_id=0, byte_fallback=True,
                           add_prefix_space=True, charsmap=b"", collapse_whitespace=False,
                           merges=None) -> BackendTokenizer:
    unk_id = unk_id if 0 <= unk_id < len(pieces) else None
    if kind == "bpe":
        vocab = {p: i for i, p in enumerate(pieces)}
        merges = merges if merges is not None else merges_from_scores(pieces, scores, types)
        model = models.BPE(vocab=vocab, merges=merges, unk_token=pieces[unk_id] if unk_id is not None else None,
                           fuse_unk=True, byte_fallback=byte_fallback, dropout=None)
    else:
        model = models.Unigram(list(zip(pieces, scores)), unk_id=unk_id, byte_fallback=byte_fallback)
    backend = BackendTokenizer(model)
    # sentencepiece's own order: charsmap, whitespace cleanup, dummy prefix, spaces → "▁".
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    if collapse_whitespace:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if add_prefix_space:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    add_typed_special_tokens(backend, pieces, types)
    return backend


def add_typed_special_tokens(backend: BackendTokenizer, tokens, types, alphabet=None) -> None:
    """Control / unknown tokens become special added tokens and user-defined ones plain added
    tokens, so they are matched whole in text."""
    special = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
               if k in (CONTROL, UNKNOWN) and (alphabet is None or set(t) <= alphabet)]
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)
