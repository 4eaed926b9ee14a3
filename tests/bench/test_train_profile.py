"""``python -m medjax.bench train_profile``'s two profilers, in process on a tiny preset."""
import pytest

from medjax.bench import train_profile
from medjax.bench.train import _batch


@pytest.mark.slow
def test_both_profiles_name_their_matmuls_and_shares():
    batch = _batch(512, 2, 16)
    mj = train_profile.profile_medjax("preset:tiny-llama3", True, batch, 1, 4, 50)
    hf = train_profile.profile_hf("preset:tiny-llama3", True, batch, 1, 4, 50)
    for res in (mj, hf):
        shares = [share for _, _, share in res["ops"]]
        rounding = 0.0005 * len(shares)          # each share is rounded to 3 decimals
        assert res["ops"] and 0.9 <= sum(shares) <= 1 + rounding and shares == sorted(shares, reverse=True)
        assert res["step_s"] > 0
    assert any("mm" in name for name, _, _ in hf["ops"])
    assert any("dot" in name or "ynn" in name for name, _, _ in mj["ops"])
    assert mj["flops"] > 0
