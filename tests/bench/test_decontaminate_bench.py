"""``python -m medjax.bench decontaminate`` on a tiny corpus: both scanners find the planted rows."""
import json

from medjax.bench import __main__ as bench


def test_decontaminate_bench_tiny(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench.main(["decontaminate", "--size-mb", "0.5", "--items", "200", "--vocab", "2000",
                       "--plant-every", "100", "--workers", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["agree"] and result["planted"] > 0
    assert [r["flagged_rows"] for r in result["rows"]] == [result["planted"]] * 2
    assert "| naive set-of-tuples (1 process) |" in capsys.readouterr().out
