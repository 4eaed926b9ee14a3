"""``python -m medjax.plan --serve``: the KV pages beside Llama-3-8B on one H100 and one v5e."""
from medjax.ops.hardware import CHIPS
from medjax.plan.__main__ import main
from medjax.serve.budget import pool_bytes

GiB = 2 ** 30


def test_plan_serve_states_pages_on_h100_and_v5e(capsys):
    assert main(["--serve"]) == 0
    out = capsys.readouterr().out
    # Llama-3-8B page: 2 (K, V) x 32 layers x 16 tokens x 8 KV heads x 128 x 2 bytes = 2 MiB
    assert "16-token pages of 2.00 MiB" in out
    h100 = CHIPS["h100"].hbm_bytes          # the one hardware table: 79.1 GiB
    h100_pages = int(pool_bytes(h100, 8_030_261_248 * 2, 0.9) // (2 * 2**20))
    assert f"h100 ({h100 / GiB:.0f} GiB): {h100_pages} pages = {h100_pages * 16} tokens" in out
    assert "v5e (16 GiB): no page fits" in out                       # bf16 weights: 15 GiB
    assert "v5e (16 GiB): 3189 pages" in out                         # int8 weights
