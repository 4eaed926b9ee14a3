"""Written files follow the umask (issue 30): exports, GGUF, PEFT adapters, checkpoints, reports
and tokenizer files are written to a temp beside their target and renamed (medjax/outputs.py);
``tempfile`` makes those temps 0600 / 0700, so without the fix a team on a shared cluster could
not read an export. Under umask 022 every file must be 0644 and every directory 0755; under 077,
0600 / 0700 (the umask is followed, not replaced by a fixed mode)."""
import os
import stat
from pathlib import Path

import jax.numpy as jnp
import pytest


@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(*roots: Path) -> dict[str, int]:
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
            out[str(p)] = stat.S_IMODE(p.stat().st_mode)
    return out


@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True, ids=["022", "077"])
def test_every_writer_follows_the_umask(umask, rel_model_dir, tmp_path):
    import medjax
    from medjax.config import LoraSection
    from medjax.eval.report import write_json
    from medjax.lora import apply_lora
    from medjax.training.checkpoint import Checkpointer
    from medjax.training.peft_export import save_peft

    model, tokenizer = medjax.load(rel_model_dir, progress=False)
    hf = medjax.save_hf(model, tmp_path / "hf", tokenizer=tokenizer)
    gguf = medjax.save_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer, type="f32")
    report = tmp_path / "reports" / "results.json"
    write_json(report, {"acc": 0.5})
    apply_lora(model, LoraSection(enabled=True, rank=2, alpha=4, targets=("q_proj",)))
    peft = save_peft(model, tmp_path / "peft")
    ckpt = Checkpointer(tmp_path / "ckpt", every=1, keep=1, async_save=False)
    ckpt.save(1, {"w": jnp.ones((2, 2))}, {"step": 1})
    ckpt.wait()
    ckpt.close()

    modes = _modes(hf, gguf, report.parent, peft, tmp_path / "ckpt")
    assert any(p.endswith("model.safetensors") for p in modes) and any(p.endswith(".gguf") for p in modes)
    assert any(p.endswith("adapter_model.safetensors") for p in modes)
    assert any(p.endswith("tokenizer.json") for p in modes)
    wrong = {p: oct(m) for p, m in modes.items()
             if m != (0o777 if Path(p).is_dir() else 0o666) & ~umask}
    assert not wrong, f"umask {oct(umask)}: {wrong}"


def test_write_file_leaves_no_temp_on_failure(tmp_path):
    from medjax.outputs import write_file
    write_file(tmp_path / "a.txt", "first")
    with pytest.raises(TypeError):
        write_file(tmp_path / "a.txt", 5)          # not bytes/str: fails inside the write
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "first"
