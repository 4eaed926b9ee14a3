"""Write LoRA adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names a Linear adapter ``base_model.model.<hf module path>.lora_A.weight`` with shape
``[r, in]`` and ``lora_B.weight`` ``[out, r]`` — the transposes of our ``lora_a [in, r]`` and
``lora_b [r, out]`` — and scales by ``lora_alpha / r`` exactly as :mod:`medjax.lora` does.
Our module paths already are HF's (``model.layers.3.self_attn.q_proj``). Mixtral expert and
router adapters have no PEFT Linear equivalent in transformers 5 (experts are fused 3-D
parameters there), so they are refused with a pointer to the merged export.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from medjax.lora import LoRAExperts, LoRALinear, lora_modules


def peft_tensors(model) -> tuple[dict, dict]:
    """``({peft_name: np.ndarray}, info)`` with info = rank, alpha, dropout, target names."""
    tensors, targets, ranks, alphas, dropouts = {}, set(), set(), set(), set()
    for path, wrapper in lora_modules(model):
        if isinstance(wrapper, LoRAExperts) or ".block_sparse_moe." in f".{path}.":
            raise NotImplementedError(
                f"{path}: PEFT has no Linear adapter for Mixtral experts/router in transformers 5; "
                "export the merged model instead (train.export=[hf] / --merge-lora)")
        assert isinstance(wrapper, LoRALinear)
        adapter = wrapper.adapter
        a_IR = np.asarray(adapter.lora_a[...], np.float32)
        b_RO = np.asarray(adapter.lora_b[...], np.float32)
        assert a_IR.ndim == 2 and b_RO.ndim == 2, (path, a_IR.shape, b_RO.shape)
        prefix = f"base_model.model.{path}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_IR.T)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_RO.T)
        targets.add(path.rsplit(".", 1)[-1])
        ranks.add(adapter.rank)
        alphas.add(adapter.scale * adapter.rank)
        dropouts.add(adapter.dropout.rate if adapter.dropout is not None else 0.0)
    if not tensors:
        raise ValueError("model has no LoRA adapters to export")
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"PEFT export needs one rank/alpha for all adapters, got {ranks} / {alphas}")
    return tensors, {"rank": ranks.pop(), "alpha": alphas.pop(), "dropout": max(dropouts),
                     "targets": sorted(targets)}


def save_peft(model, out_dir, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the PEFT adapter directory atomically (temp dir + rename)."""
    from safetensors.numpy import save_file

    tensors, info = peft_tensors(model)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(info["rank"]),
        "lora_alpha": float(info["alpha"]), "lora_dropout": float(info["dropout"]),
        "target_modules": info["targets"], "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "base_model_name_or_path": base_model_name_or_path,
    }
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        import shutil
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out
