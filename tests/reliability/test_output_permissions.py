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


def _modes(*roots: Path) -> dict[str, int]:
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
            out[str(p)] = stat.S_IMODE(p.stat().st_mode)
    return out


def _write_everything(model, lora_model, tokenizer, out: Path) -> dict[str, int]:
    """Every kind of output file medjax writes, under ``out``; their modes."""
    import medjax
    from medjax.eval.report import write_json
    from medjax.train.checkpoint import Checkpointer
    from medjax.hf.peft_export import save_peft
    hf = medjax.save_hf(model, out / "hf", tokenizer=tokenizer)
    gguf = medjax.save_gguf(model, out / "model.gguf", tokenizer=tokenizer, type="f32")
    report = out / "reports" / "results.json"
    write_json(report, {"acc": 0.5})
    peft = save_peft(lora_model, out / "peft")
    ckpt = Checkpointer(out / "ckpt", every=1, keep=1, async_save=False)
    ckpt.save(1, {"w": jnp.ones((2, 2))}, {"step": 1})
    ckpt.wait()
    ckpt.close()
    return _modes(hf, gguf, report.parent, peft, out / "ckpt")


def test_every_writer_follows_the_umask(rel_model_dir, tmp_path):
    import medjax
    from medjax.config import LoraSection
    from medjax.lora import apply_lora
    model, tokenizer = medjax.load(rel_model_dir, progress=False)
    lora_model, _ = medjax.load(rel_model_dir, progress=False)
    apply_lora(lora_model, LoraSection(enabled=True, rank=2, alpha=4, targets=("q_proj",)))
    for umask in (0o022, 0o077):
        old = os.umask(umask)
        try:
            modes = _write_everything(model, lora_model, tokenizer, tmp_path / oct(umask))
        finally:
            os.umask(old)
        names = [Path(p).name for p in modes]
        for name in ("model.safetensors", "model.gguf", "adapter_model.safetensors", "tokenizer.json",
                     "results.json", "_CHECKPOINT_METADATA"):
            assert name in names, name
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
