"""``python -m medjax.bench``: dispatcher and a CPU smoke run of the attention benchmark."""
import json

from medjax.bench import __main__ as bench
from medjax.cli_errors import run_cli
from medjax.bench import attention as attention_bench


def test_dispatcher_lists_and_rejects(capsys):
    assert "attention" in bench.available()
    assert run_cli(bench.main, ["no-such-benchmark"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown benchmark 'no-such-benchmark'")


def test_unmasked_pairs_counts_the_mask():
    assert attention_bench.unmasked_pairs(2, 10, causal=True, window=None) == 2 * 55
    assert attention_bench.unmasked_pairs(1, 10, causal=False, window=None) == 100
    # window 3: each query sees itself and up to 2 previous keys.
    assert attention_bench.unmasked_pairs(1, 10, causal=True, window=3) == 1 + 2 + 3 * 8


def test_attention_bench_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = bench.main(["attention", "--shape", "1,32,2,1,16", "--impls", "xla,pallas,cudnn",
                     "--mode", "fwdbwd", "--iters", "1", "--warmup", "0", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| pallas |" in table and "unavailable on cpu" in table
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["xla"]["ms"] > 0 and rows["pallas"]["tflops"] > 0
    assert "error" in rows["cudnn"]
