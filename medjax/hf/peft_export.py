"""Write LoRA adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

The adapter targets the model as transformers 5 builds it in memory, and loads with
``peft.PeftModel.from_pretrained(hf_base, dir)`` (tested against peft 0.21).

* Linear adapters (attention and dense-MLP projections) go through ``target_modules``:
  ``base_model.model.<path>.lora_A.weight [r, in]`` and ``lora_B.weight [out, r]``, the
  transposes of our ``lora_a [in, r]`` / ``lora_b [r, out]``; PEFT scales by ``lora_alpha / r``
  exactly as :mod:`medjax.lora` does. Our module paths already are HF's.
* Mixtral router and expert adapters go through ``target_parameters`` (PEFT's ``ParamWrapper``,
  LoRA on an ``nn.Parameter``). transformers 5 names the MoE block ``mlp`` (ours is
  ``block_sparse_moe``), its router is ``mlp.gate.weight [E, H]`` (not an ``nn.Linear``) and its
  experts are fused 3-D parameters ``mlp.experts.gate_up_proj [E, 2I, H]`` (gate rows first) and
  ``mlp.experts.down_proj [E, H, I]``.

  - Router: a 2-D parameter gets the same ``[r, in]`` / ``[out, r]`` tensors as a Linear.
  - Experts: for a 3-D ``[E, out, in]`` parameter ParamWrapper keeps a separate adapter per
    expert, ``delta[e] = lora_alpha/r · B_e @ A_e``, stored as ``lora_A.weight [E·r, in]`` (row
    ``e·r + k``) and ``lora_B.weight [out, r·E]`` (column ``k·E + e``) — which is exactly our
    per-expert ``A[e] [in, r]``, ``B[e] [r, out]``.
  - Our separate gate and up adapters (rank r each) become one rank-2r adapter on
    ``gate_up_proj``: A stacked along the rank, B block-diagonal (gate block in the first I
    outputs, up block in the last I), ``lora_alpha`` doubled so that ``alpha / r`` is unchanged
    (only one of the two targeted: rank r, the other half of B zero).
    That rank/alpha goes into ``rank_pattern`` / ``alpha_pattern`` (keyed by full parameter
    path). peft 0.21 applies them but warns they "did not match any targeted module": its check
    looks at modules only, not at ``target_parameters`` — the warning is spurious.
  - When ``gate_up_proj`` and ``down_proj`` are both targeted PEFT nests two ParamWrappers on
    ``mlp.experts``, wrapping parameters in registration order (gate_up_proj first, innermost),
    so gate_up's tensors live under ``mlp.experts.base_layer.`` and down's under ``mlp.experts.``.
  - ParamWrapper refuses ``lora_dropout != 0``, so the config then says ``lora_dropout: 0.0``
    (dropout is the identity at inference; training further in PEFT would run without it).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from flax import nnx

from medjax.lora import LoRAExperts, LoRALinear, lora_modules
from medjax.models.stack import num_stacked, unstack_module
from medjax.outputs import replace_dir, temp_dir_beside
from medjax.sharding import host_value


def _np(var) -> np.ndarray:
    """The whole adapter on every process (gathered when it is sharded over several)."""
    return np.asarray(host_value(var[...]), np.float32)


def _linear_factors(adapter):
    """PEFT ``(lora_A [r, in], lora_B [out, r])`` of a 2-D adapter."""
    return np.ascontiguousarray(_np(adapter.lora_a).T), np.ascontiguousarray(_np(adapter.lora_b).T)


def _expert_factors(a_EIR: np.ndarray, b_ERO: np.ndarray):
    """PEFT ParamWrapper ``(lora_A [E·r, in], lora_B [out, r·E])`` for per-expert ``A``, ``B``."""
    E, I, R = a_EIR.shape
    lora_a = a_EIR.transpose(0, 2, 1).reshape(E * R, I)           # row e*R + k = A[e][:, k]
    lora_b = b_ERO.transpose(2, 1, 0).reshape(b_ERO.shape[-1], R * E)  # column k*E + e = B[e][k]
    return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)


def _fused_gate_up(wrapper: LoRAExperts):
    """Gate and up adapters as one on ``gate_up_proj``: ``(A [E, H, R], B [E, R, 2I], scale)``."""
    names = [n for n in ("gate_proj", "up_proj") if n in wrapper.projections]
    adapters = [getattr(wrapper, n) for n in names]
    scales = {ad.scale for ad in adapters}
    if len(scales) != 1:
        raise ValueError(f"gate_proj/up_proj adapters with different alpha/rank {scales} cannot "
                         "be fused into one gate_up_proj adapter")
    a_EHR = np.concatenate([_np(ad.lora_a) for ad in adapters], axis=-1)
    E, inter = a_EHR.shape[0], adapters[0].lora_b[...].shape[-1]
    b_ERO = np.zeros((E, a_EHR.shape[-1], 2 * inter), np.float32)
    row = 0
    for name, ad in zip(names, adapters):
        col = 0 if name == "gate_proj" else inter
        b_ERO[:, row:row + ad.rank, col:col + inter] = _np(ad.lora_b)
        row += ad.rank
    return a_EHR, b_ERO, scales.pop()


def _per_layer_wrappers(model):
    """``[(dotted path, wrapper)]`` with stacked-layer wrappers (``model.layers.x``, adapters
    ``[L, ...]``) split into one per layer (``model.layers.{i}.x``): PEFT names are per layer."""
    out = []
    for path, wrapper in lora_modules(model):
        adapter = wrapper.adapter if isinstance(wrapper, LoRALinear) else getattr(
            wrapper, wrapper.projections[0])
        if not num_stacked(adapter.lora_a):
            out.append((path, wrapper))
            continue
        head, tail = path.split(".layers.", 1)
        per_layer = unstack_module(wrapper, leave=nnx.PathContains("base"))   # adapters only
        out.extend((f"{head}.layers.{i}.{tail}", w) for i, w in enumerate(per_layer))
    return out


def peft_tensors(model) -> tuple[dict, dict]:
    """``({peft_name: np.ndarray}, info)``; info holds the LoraConfig fields to write."""
    tensors = {}
    modules, params = set(), set()
    shapes = {}          # PEFT pattern key (HF module / parameter path) -> (rank, alpha)
    dropouts = set()

    def put(prefix, key, factors, rank, scale):
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = factors
        shapes[key] = (int(rank), float(scale * rank))

    for path, wrapper in _per_layer_wrappers(model):
        moe = ".block_sparse_moe." in f".{path}."
        hf = path.replace(".block_sparse_moe.", ".mlp.")   # transformers 5 module path
        prefix = f"base_model.model.{hf}"
        if isinstance(wrapper, LoRALinear):
            adapter = wrapper.adapter
            assert adapter.lora_a[...].ndim == 2, (path, adapter.lora_a[...].shape)
            dropouts.add(adapter.dropout.rate if adapter.dropout is not None else 0.0)
            if moe:   # the router: nn.Parameter mlp.gate.weight [E, H]
                if not path.endswith(".block_sparse_moe.gate"):
                    raise NotImplementedError(f"{path}: no PEFT target for this MoE Linear")
                put(prefix, f"{hf}.weight", _linear_factors(adapter), adapter.rank, adapter.scale)
                params.add("mlp.gate.weight")
            else:
                put(prefix, hf, _linear_factors(adapter), adapter.rank, adapter.scale)
                modules.add(hf.rsplit(".", 1)[-1])
            continue
        assert isinstance(wrapper, LoRAExperts), (path, type(wrapper))
        if not moe or not path.endswith(".block_sparse_moe.experts"):
            raise NotImplementedError(f"{path}: experts outside a Mixtral block_sparse_moe")
        for name in wrapper.projections:
            ad = getattr(wrapper, name)
            dropouts.add(ad.dropout.rate if ad.dropout is not None else 0.0)
        fused = any(n in wrapper.projections for n in ("gate_proj", "up_proj"))
        nested = fused and "down_proj" in wrapper.projections
        if fused:
            a, b, scale = _fused_gate_up(wrapper)
            put(prefix + (".base_layer" if nested else ""), f"{hf}.gate_up_proj",
                _expert_factors(a, b), a.shape[-1], scale)
            params.add("mlp.experts.gate_up_proj")
        if "down_proj" in wrapper.projections:
            ad = wrapper.down_proj
            put(prefix, f"{hf}.down_proj", _expert_factors(_np(ad.lora_a), _np(ad.lora_b)),
                ad.rank, ad.scale)
            params.add("mlp.experts.down_proj")
    if not tensors:
        raise ValueError("model has no LoRA adapters to export")
    (rank, alpha), _ = Counter(shapes.values()).most_common(1)[0]
    odd = {k: v for k, v in shapes.items() if v != (rank, alpha)}
    return tensors, {
        "rank": rank, "alpha": alpha,
        "rank_pattern": {k: r for k, (r, _) in odd.items()},
        "alpha_pattern": {k: a for k, (_, a) in odd.items()},
        # ParamWrapper (target_parameters) refuses dropout; it is the identity at inference.
        "dropout": 0.0 if params else max(dropouts),
        # [] not None: None would make PEFT fall back to its default target_modules for the model type
        "target_modules": sorted(modules), "target_parameters": sorted(params) or None,
    }


def save_peft(model, out_dir, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the PEFT adapter directory atomically (temp dir + rename). In several processes
    every one gathers the adapters (a collective) and process 0 alone writes."""
    import shutil

    import jax

    from medjax.hf.safetensors_io import write_safetensors

    tensors, info = peft_tensors(model)
    out = Path(out_dir).resolve()
    if jax.process_index() != 0:
        return out
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(info["rank"]),
        "lora_alpha": float(info["alpha"]), "lora_dropout": float(info["dropout"]),
        "target_modules": info["target_modules"], "target_parameters": info["target_parameters"],
        "rank_pattern": info["rank_pattern"], "alpha_pattern": info["alpha_pattern"],
        "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "base_model_name_or_path": base_model_name_or_path,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)                                  # the umask's mode, not mkdtemp's 0700
    try:              # a full disk (ENOSPC names the file) leaves no temporary directory behind
        write_safetensors(tmp / "adapter_model.safetensors",
                          [(k, a.dtype, a.shape, [a]) for k, a in tensors.items()])
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
