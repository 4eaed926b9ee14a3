"""A tiny byte-level BPE tokenizer (trained here, no downloads) with Llama-like BOS/EOS and ChatML."""
import pytest
from tokenizers import Tokenizer as BackendTokenizer, decoders, models, pre_tokenizers, trainers

from medjax.tokenizer import Tokenizer

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The heart pumps blood through the arteries and veins of the body.",
    "Aspirin inhibits cyclooxygenase and reduces platelet aggregation.",
    "Metformin is the first-line treatment for type 2 diabetes mellitus.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n user assistant system",
] * 10


def tiny_tokenizer(vocab_size=400, **kwargs) -> Tokenizer:
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    options = dict(bos_token="<s>", eos_token="</s>", add_bos_token=True, chat_template="chatml")
    options.update(kwargs)
    return Tokenizer(backend, **options)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def make_tokenizer():
    return tiny_tokenizer


def _write_jsonl(path, rows):
    import json
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def write_jsonl():
    return _write_jsonl
