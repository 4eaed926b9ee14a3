"""``python -m medjax.eval`` in 2 processes equals 1 process: ``launch/local_multiprocess.sh -n 2
-d 2 -- python -m medjax.eval ... mesh.preset=fsdp`` against the same command in one process with
4 devices. The weights load sharded over the 4-device fsdp mesh (each process reading its
blocks), every batch is split over both processes' devices, and process 0 alone writes
``--output``. Short MedMCQA contexts go through the packed path, long MedQA ones (bytes: the
tiny model's tokenizer) through the bucketed one.
"""
import json

import pytest

from train.test_multihost_train import _module     # the launcher / one-process runner


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A random tiny-llama2 exported by medjax (byte-level tokenizer), loadable by medjax.eval."""
    import medjax
    from medjax.models import get_preset, init_decoder
    from medjax.tokenizer import byte_tokenizer
    out = tmp_path_factory.mktemp("tiny_hf") / "model"
    return medjax.save_hf(init_decoder(get_preset("tiny-llama2"), seed=3), out, tokenizer=byte_tokenizer())


def _eval(model_dir, data_dir, out_json, *, processes, devices):
    return _module("medjax.eval", "--model", str(model_dir), "--data-dir", str(data_dir),
                   "--tasks", "medqa_4options,medmcqa", "--limit", "6", "--batch-tokens", "2048",
                   "--log-samples", "--output", str(out_json), "mesh.preset=fsdp",
                   processes=processes, devices=devices)


@pytest.mark.slow
def test_two_processes_score_like_one(tmp_path, tiny_hf_dir, benchmarks_dir):
    one = _eval(tiny_hf_dir, benchmarks_dir, tmp_path / "one.json", processes=1, devices=4)
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]
    two = _eval(tiny_hf_dir, benchmarks_dir, tmp_path / "two.json", processes=2, devices=2)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "two.json"]
    assert "[p1] wrote" not in two.stdout and "[p0] wrote" in two.stdout   # process 0 writes
    ref, got = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for task in ("medqa_4options", "medmcqa"):
        assert got["results"][task]["acc"] == ref["results"][task]["acc"]
        assert len(ref["samples"][task]) == 6
        for a, b in zip(ref["samples"][task], got["samples"][task]):
            assert a["doc_id"] == b["doc_id"] and a["acc"] == b["acc"], (task, a["doc_id"])
            assert b["loglikelihoods"] == pytest.approx(a["loglikelihoods"], abs=1e-5, rel=1e-5)
