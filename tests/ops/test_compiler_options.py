"""``ops.target.compiler_options``: on CPU a step over scanned bf16 weights converts one layer at
a time to f32 (XLA:CPU has no bf16 dot) instead of holding an f32 copy of the whole stack, and
medjax's train step is compiled that way."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from medjax.ops.target import compiler_options

D, LAYERS = 512, 16


def _scanned_grad_temp_bytes(options) -> int:
    """Temporaries of grad(x) through a remat scan over a [16, 512, 512] bf16 stack (8 MiB)."""
    w = jax.ShapeDtypeStruct((LAYERS, D, D), jnp.bfloat16)
    x = jax.ShapeDtypeStruct((64, D), jnp.bfloat16)
    layer = jax.checkpoint(lambda h, w: (jnp.tanh(h @ w), None))
    loss = lambda w, x: jax.lax.scan(layer, x, w)[0].astype(jnp.float32).sum()
    compiled = jax.jit(jax.grad(loss, argnums=1), compiler_options=options).lower(w, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_cpu_options_keep_the_f32_convert_of_a_scanned_stack_inside_the_loop():
    stack = LAYERS * D * D * 2
    assert _scanned_grad_temp_bytes(None) > 2 * stack                  # XLA's default: an f32 copy
    assert _scanned_grad_temp_bytes(compiler_options(jax.devices("cpu")[0])) < stack / 2   # ~2 layers


def test_options_follow_the_platform_of_the_arrays_or_mesh():
    cpu = jax.devices("cpu")[0]
    assert compiler_options(cpu) == compiler_options({"w": jnp.ones(2)}) is not None
    mesh = jax.sharding.Mesh(np.array([cpu]), ("data",))
    assert compiler_options(mesh) == compiler_options(cpu)
    assert compiler_options({}) is None                                 # nothing to place: defaults
    assert compiler_options(jax.sharding.AbstractMesh((1,), ("data",))) is None


def _materialized_shapes(hlo: str) -> set[str]:
    """Result shapes of the instructions that own a buffer: those outside fused computations."""
    fused = set(re.findall(r"calls=(%[\w.\-]+)", hlo))
    shapes, computation = set(), None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?(%[\w.\-]+) .*\{$", line)
        if header:
            computation = header.group(1)
        elif computation not in fused:
            result = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (\w+\[[\d,]*\])", line)
            if result:
                shapes.add(result.group(1))
    return shapes


def test_the_melt_llama2_step_holds_no_f32_copy_of_its_bf16_layer_stack(mesh_devices):
    """The recipe's own step (bf16 weights, scanned layers, remat full, LoRA on every projection)
    at tiny size, built by medjax.train's builder for this CPU: no f32 buffer of a stacked
    weight's shape in the compiled program; with XLA's pass back on, there is."""
    from medjax.config import load_config
    from medjax.plan.accounting import model_config
    from medjax.plan.compile import abstract_step
    from medjax.sharding import make_mesh
    cfg = load_config("configs/melt_llama2_lora.yaml", ["model=tiny", "model.dtype=bfloat16",
                                                       "model.param_dtype=bfloat16"])
    assert cfg.model.scan_layers and cfg.model.remat == "full"
    step, args = abstract_step(cfg, make_mesh(cfg.mesh), model_config(cfg))
    stacks = {"f32[" + ",".join(map(str, x.shape)) + "]" for x in jax.tree.leaves(args[1])
              if x.ndim == 3 and x.dtype == jnp.bfloat16}
    assert len(stacks) >= 3                            # the frozen bf16 base: [L, in, out] each
    lowered = step.lower(*args)
    assert not stacks & _materialized_shapes(lowered.compile().as_text())
    hoisted = _materialized_shapes(lowered.compile({"xla_disable_hlo_passes": ""}).as_text())
    assert stacks & hoisted                            # the control: XLA's default hoists them


def test_the_lora_merge_folds_a_bf16_stack_without_an_f32_copy_of_it():
    """``lora._folded`` (export, eval of a run; ``lora.fold_matrices``, which QLoRA's merge also
    runs) merges one [in, out] matrix at a time; compiled with XLA's defaults the fp32 convert of
    the whole stack is hoisted out of its loop."""
    from medjax.lora import _as_stored, _fold_program, _folded
    w = jax.ShapeDtypeStruct((LAYERS, D, 4 * D), jnp.bfloat16)
    a = jax.ShapeDtypeStruct((LAYERS, D, 8), jnp.float32)
    b = jax.ShapeDtypeStruct((LAYERS, 8, 4 * D), jnp.float32)
    f32_stack = LAYERS * D * 4 * D * 4

    def temp(options):
        compiled = _fold_program(_as_stored, jnp.dtype(w.dtype), options).lower(
            w, a, b, scale=0.5).compile()
        return compiled.memory_analysis().temp_size_in_bytes
    assert temp(()) >= f32_stack
    used = tuple(sorted(compiler_options(jax.devices("cpu")[0]).items()))
    assert temp(used) < f32_stack / 4
    # and _folded itself compiles with the options of its arrays' platform
    _fold_program.cache_clear()
    args = [jnp.ones(s.shape, s.dtype) for s in (w, a, b)]
    np.testing.assert_allclose(np.asarray(_folded(*args, 0.5)[0, 0, :4], np.float32), 1 + 0.5 * 8)
    _fold_program(_as_stored, jnp.dtype(w.dtype), used)
    assert _fold_program.cache_info().hits == 1
