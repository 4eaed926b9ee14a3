"""make_dataset: batch contract, packing invariants, resume, host sharding, loss masks, mixtures."""
import json

import numpy as np

from medjax.config import DataSection
from medjax.data import make_dataset, packing_efficiency

KEYS = ("input_ids", "positions", "segment_ids", "targets", "loss_mask")


def texts_file(tmp_path, write_jsonl, n=40):
    rows = [{"text": f"record {i}: " + "the heart pumps blood " * (1 + i % 7)} for i in range(n)]
    return write_jsonl(tmp_path / "texts.jsonl", rows)


def segments(batch, prefix=""):
    """Every packed example as its token list, in order."""
    out = []
    for ids, seg in zip(batch[prefix + "input_ids"], batch[prefix + "segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            out.append(ids[seg == s].tolist())
    return out


def record_ids(tokenizer, batches):
    ids = []
    for batch in batches:
        for seg in segments(batch):
            text = tokenizer.decode(seg)
            ids.append(int(text.split(":")[0].split()[1]))
    return ids


def test_batch_contract_and_packing_invariants(tmp_path, tokenizer, write_jsonl):
    cfg = DataSection(train=str(texts_file(tmp_path, write_jsonl)), seq_len=64)
    it = make_dataset(cfg, tokenizer, batch_size=4, seed=0, process_index=0, process_count=1, num_epochs=1)
    for batch in it:
        assert sorted(batch) == sorted(KEYS)
        for k in KEYS:
            assert batch[k].shape == (4, 64)
            assert batch[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
        for b in range(4):
            seg, pos, ids, tgt, mask = (batch[k][b] for k in ("segment_ids", "positions", "input_ids", "targets", "loss_mask"))
            for s in np.unique(seg[seg > 0]):
                where = np.flatnonzero(seg == s)
                assert (np.diff(where) == 1).all()                            # contiguous
                assert (pos[where] == np.arange(len(where))).all()           # positions restart
                assert (tgt[where[:-1]] == ids[where[1:]]).all()             # next token in segment
                assert mask[where[-1]] == 0 and (mask[where[:-1]] == 1).all()  # text: all but last
                assert ids[where[0]] == tokenizer.bos_id and ids[where[-1]] == tokenizer.eos_id
            assert (mask[seg == 0] == 0).all()
    assert packing_efficiency(batch) > 0


def test_resume_mid_epoch(tmp_path, tokenizer, write_jsonl):
    cfg = DataSection(train=str(texts_file(tmp_path, write_jsonl)), seq_len=64)
    make = lambda: make_dataset(cfg, tokenizer, batch_size=2, seed=3, process_index=0, process_count=1)
    it = make()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = [next(it) for _ in range(4)]
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in KEYS:
            np.testing.assert_array_equal(got[k], want[k])


def test_two_hosts_disjoint_and_covering(tmp_path, tokenizer, write_jsonl):
    n = 40
    cfg = DataSection(train=str(texts_file(tmp_path, write_jsonl, n)), seq_len=64)
    seen = []
    for host in range(2):
        it = make_dataset(cfg, tokenizer, batch_size=4, seed=7, num_epochs=1, process_index=host, process_count=2)
        seen.append(record_ids(tokenizer, it))
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(n))


def test_epochs_reshuffle_and_cover(tmp_path, tokenizer, write_jsonl):
    cfg = DataSection(train=str(texts_file(tmp_path, write_jsonl, 12)), seq_len=64, pack=False)
    ids = record_ids(tokenizer, make_dataset(cfg, tokenizer, batch_size=4, seed=1, num_epochs=2,
                                             process_index=0, process_count=1))
    assert sorted(ids[:12]) == sorted(ids[12:]) == list(range(12)) and ids[:12] != ids[12:]


def test_long_examples_split_and_truncate(tmp_path, tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "the heart pumps blood " * 40}])
    full = tokenizer.encode("the heart pumps blood " * 40, add_special_tokens=True) + [tokenizer.eos_id]
    for mode in ("split", "truncate"):
        cfg = DataSection(train=str(path), seq_len=32, long_examples=mode)
        it = make_dataset(cfg, tokenizer, batch_size=1, seed=0, num_epochs=1, process_index=0, process_count=1)
        got = [tok for batch in it for seg in segments(batch) for tok in seg]
        assert got == (full if mode == "split" else full[:32])


def test_chat_loss_mask_covers_exactly_assistant_turns(tmp_path, tokenizer, write_jsonl):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What does aspirin do?"},
                {"role": "assistant", "content": "It inhibits platelets."},
                {"role": "user", "content": "And metformin?"},
                {"role": "assistant", "content": "It treats type 2 diabetes."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    cfg = DataSection(train=str(path), format="chat", seq_len=128, pack=False)
    batch = next(make_dataset(cfg, tokenizer, batch_size=1, seed=0, process_index=0, process_count=1))
    ids, mask, tgt = batch["input_ids"][0], batch["loss_mask"][0], batch["targets"][0]
    real = batch["segment_ids"][0] > 0
    # independent reference: ChatML writes each assistant turn as CONTENT<|im_end|>\n
    assert tokenizer.decode(ids[real], skip_special_tokens=False) == "".join(
        f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    scored = tokenizer.decode(tgt[mask > 0], skip_special_tokens=False)
    assert scored == "It inhibits platelets.<|im_end|>\nIt treats type 2 diabetes.<|im_end|>\n"
    expected_count = sum(len(tokenizer.encode(f"{m['content']}<|im_end|>\n")) for m in messages if m["role"] == "assistant")
    assert int(mask.sum()) == expected_count


def test_alpaca_scores_response_and_eos_only(tmp_path, tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Name the drug class.", "input": "metformin",
                                               "output": "Biguanide."}])
    batch = next(make_dataset(DataSection(train=str(path), format="alpaca", seq_len=128, pack=False), tokenizer,
                              batch_size=1, seed=0, process_index=0, process_count=1))
    scored = batch["targets"][0][batch["loss_mask"][0] > 0]
    assert tokenizer.decode(scored, skip_special_tokens=False) == "Biguanide.</s>"
    text = tokenizer.decode(batch["input_ids"][0][batch["segment_ids"][0] > 0], skip_special_tokens=False)
    assert text.startswith("<s>Below is an instruction") and "### Input:\nmetformin\n\n### Response:\nBiguanide." in text


def test_mcqa_and_preference(tmp_path, tokenizer, write_jsonl):
    mcqa = write_jsonl(tmp_path / "m.jsonl", [{"question": "Drug for anaphylaxis?", "options": {"A": "Epinephrine",
                                               "B": "Aspirin"}, "answer": "A"}])
    batch = next(make_dataset(DataSection(train=str(mcqa), format="mcqa", seq_len=128, pack=False), tokenizer,
                              batch_size=1, seed=0, process_index=0, process_count=1))
    assert tokenizer.decode(batch["targets"][0][batch["loss_mask"][0] > 0], skip_special_tokens=False) == "A. Epinephrine</s>"
    pref = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Question {i}?", "chosen": "Good answer.",
                                               "rejected": "Bad."} for i in range(6)])
    cfg = DataSection(train=str(pref), format="preference", prompt_style="chat", seq_len=64)
    batch = next(make_dataset(cfg, tokenizer, batch_size=2, seed=0, process_index=0, process_count=1))
    assert sorted(batch) == sorted(p + k for p in ("chosen_", "rejected_") for k in KEYS)
    chosen, rejected = segments(batch, "chosen_"), segments(batch, "rejected_")
    assert len(chosen) == len(rejected) > 2  # packed, pairs aligned segment by segment
    for c, r in zip(chosen, rejected):
        assert tokenizer.decode(c).split("assistant")[0] == tokenizer.decode(r).split("assistant")[0]
        assert "Good answer." in tokenizer.decode(c) and "Bad." in tokenizer.decode(r)


def test_mixture_follows_weights(tmp_path, tokenizer, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"record {i}: alpha"} for i in range(50)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"record {100 + i}: beta"} for i in range(50)])
    cfg = DataSection(sources=({"path": str(a), "weight": 0.9}, {"path": str(b), "weight": 0.1}), seq_len=64)
    it = make_dataset(cfg, tokenizer, batch_size=4, seed=0, num_epochs=2, process_index=0, process_count=1)
    ids = record_ids(tokenizer, it)
    share = np.mean([i >= 100 for i in ids])
    assert len(ids) == 200 and 0.05 < share < 0.15


def test_heldout_rows_split_in_memory(tmp_path, tokenizer, write_jsonl):
    cfg = DataSection(train=str(texts_file(tmp_path, write_jsonl, 40)), seq_len=64, heldout_rows=6,
                      max_rows=20)
    train = record_ids(tokenizer, make_dataset(cfg, tokenizer, batch_size=4, seed=1, num_epochs=1,
                                               process_index=0, process_count=1))
    held = record_ids(tokenizer, make_dataset(cfg, tokenizer, batch_size=4, split="eval",
                                              process_index=0, process_count=1))
    assert sorted(held) == list(range(34, 40))
    assert sorted(train) == list(range(20))
    assert sorted(tmp_path.iterdir()) == [tmp_path / "texts.jsonl"]  # nothing written


def test_eval_file_is_read_whole_while_max_rows_caps_training(tmp_path, tokenizer, write_jsonl):
    """``data.eval`` is its own split: ``max_rows``/``heldout_rows`` select training rows only."""
    train_file = texts_file(tmp_path, write_jsonl, 30)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    cfg = DataSection(train=str(train_file), eval=str(texts_file(eval_dir, write_jsonl, 10)),
                      seq_len=64, heldout_rows=6, max_rows=20)
    train = record_ids(tokenizer, make_dataset(cfg, tokenizer, batch_size=4, seed=1, num_epochs=1,
                                               process_index=0, process_count=1))
    held = record_ids(tokenizer, make_dataset(cfg, tokenizer, batch_size=4, split="eval",
                                              process_index=0, process_count=1))
    assert sorted(held) == list(range(10))
    assert sorted(train) == list(range(20))
