"""The run config's sections: frozen dataclasses, each validating itself in ``__post_init__``.

``RunConfig.__post_init__`` checks what spans sections (objective vs data format, DPO reference
vs LoRA, mesh vs batch). Every error is a ``ConfigError`` naming the dotted key(s). Loading
(YAML files, ``key=value`` overrides, ``model=tiny``) is ``medjax.config.load``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Optional

from medjax.errors import ConfigError


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class ModelSection:
    path: Optional[str] = None          # HF dir or .gguf; None with a preset = random init
    preset: Optional[str] = None        # e.g. "tiny-llama", "mistral-7b"
    dtype: str = "float32"              # compute dtype
    param_dtype: str = "float32"        # storage dtype of frozen/base params
    attention: str = "auto"             # auto | xla | pallas | cudnn
    remat: str = "none"                 # none | full | dots_saveable
    scan_layers: bool = True            # stacked layer weights run by a scan (compile time flat
                                        # in depth); false: a Python loop over N layers (debugging)

    def __post_init__(self):
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("model.param_dtype", self.param_dtype, ("float32", "bfloat16", "float16"))
        _choice("model.attention", self.attention, ("auto", "xla", "pallas", "cudnn"))
        _choice("model.remat", self.remat, ("none", "full", "dots_saveable"))
        if self.path is None and self.preset is None:
            raise ConfigError("model: set model.path (HF dir or .gguf) or model.preset")


DATA_FORMATS = ("text", "alpaca", "chat", "mcqa", "preference")
DATA_FIELDS = ("text", "instruction", "input", "output", "messages", "role", "content", "question",
               "options", "answer", "contexts", "prompt", "chosen", "rejected", "system")
_SOURCE_KEYS = ("path", "tfds", "split", "weight", "format", "fields", "data_dir", "manual_dir")


@dataclass(frozen=True)
class DataSection:
    """Training data; see docs/DATA.md. ``train`` is shorthand for one source; ``sources`` is a
    weighted mixture: ``[{path: FILE|GLOB|DIR | tfds: NAME, split, data_dir, manual_dir,
    weight: 0.9, format: ..., fields: {...}}, ...]`` (format/fields default to the section's)."""
    train: Optional[str] = None         # file / glob / dir (jsonl, json, parquet, txt)
    eval: Optional[str] = None
    sources: tuple = ()                 # weighted mixture, see above
    format: str = "text"                # text | alpaca | chat | mcqa | preference
    fields: dict = field(default_factory=dict)  # our name -> the file's name, e.g. {output: response}
    prompt_style: str = "alpaca"        # how alpaca/mcqa/preference prompts render: alpaca | chat
    chat_template: Optional[str] = None  # built-in name (alpaca, llama2, llama3, mistral, chatml) or jinja
    system_prompt: Optional[str] = None  # prepended as a system turn when prompt_style=chat
    train_on_prompt: bool = False       # also score prompt tokens (loss mask 1 everywhere)
    heldout_rows: int = 0               # without data.eval: the last N rows of data.train are held out (eval split)
    max_rows: Optional[int] = None      # cap on training rows (after the held-out rows are set aside)
    seq_len: int = 512
    pack: bool = True
    pack_bins: int = 0                  # first-fit bins held open; 0 = max(2*batch, 16)
    long_examples: str = "split"        # split | truncate | drop  (examples longer than seq_len)
    shuffle: bool = True
    on_error: str = "raise"             # raise | skip
    seed: int = 0
    decontaminate: tuple = ()           # eval tasks/groups whose test items' n-grams drop training rows
    decontaminate_n: int = 13           # n-gram length for data.decontaminate (>= 5)

    def __post_init__(self):
        _choice("data.format", self.format, DATA_FORMATS)
        _check_decontaminate(self.decontaminate, self.decontaminate_n)
        _choice("data.on_error", self.on_error, ("raise", "skip"))
        _choice("data.prompt_style", self.prompt_style, ("alpaca", "chat"))
        _choice("data.long_examples", self.long_examples, ("split", "truncate", "drop"))
        _positive("data.seq_len", self.seq_len)
        if self.pack_bins < 0:
            raise ConfigError(f"data.pack_bins must be >= 0, got {self.pack_bins}")
        if self.heldout_rows < 0:
            raise ConfigError(f"data.heldout_rows must be >= 0, got {self.heldout_rows}")
        if self.max_rows is not None:
            _positive("data.max_rows", self.max_rows)
        if self.heldout_rows and self.sources and self.eval is None:
            raise ConfigError("data.heldout_rows splits a single data.train source; give a mixture "
                              "(data.sources) its own data.eval instead")
        _check_fields("data.fields", self.fields)
        if self.train is not None and self.sources:
            raise ConfigError("data: set data.train (one source) or data.sources (a mixture), not both")
        for i, source in enumerate(self.sources):
            key = f"data.sources[{i}]"
            if not isinstance(source, dict):
                raise ConfigError(f"{key}: expected a mapping like {{path: FILE, weight: 1.0}}")
            unknown = [k for k in source if k not in _SOURCE_KEYS]
            if unknown:
                raise ConfigError(f"unknown config key {key + '.' + unknown[0]!r}{did_you_mean(unknown[0], _SOURCE_KEYS)}")
            if ("path" in source) == ("tfds" in source):
                raise ConfigError(f"{key}: give exactly one of 'path' or 'tfds'")
            weight = source.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                raise ConfigError(f"{key}.weight must be a number > 0, got {weight!r}")
            if "format" in source:
                _choice(f"{key}.format", source["format"], DATA_FORMATS)
            _check_fields(f"{key}.fields", source.get("fields", {}))


def _check_decontaminate(tasks, n):
    from medjax.eval.tasks import resolve   # task names live with the tasks (raises ConfigError)

    if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
        raise ConfigError(f"data.decontaminate: expected a list of eval task names, got {tasks!r}")
    if tasks:
        try:
            resolve(list(tasks))
        except ConfigError as e:
            raise ConfigError(f"data.decontaminate: {e}") from None
    if isinstance(n, bool) or not isinstance(n, int) or n < 5:
        raise ConfigError(f"data.decontaminate_n must be an integer >= 5 (shorter n-grams match common "
                          f"phrases), got {n!r}")


def _check_fields(key, fields):
    if not isinstance(fields, dict):
        raise ConfigError(f"{key}: expected a mapping of field names, got {fields!r}")
    for name, value in fields.items():
        if name not in DATA_FIELDS:
            raise ConfigError(f"unknown config key {key + '.' + name!r}{did_you_mean(name, DATA_FIELDS)}")
        if not isinstance(value, str):
            raise ConfigError(f"{key}.{name}: expected a field name (string), got {value!r}")


@dataclass(frozen=True)
class OptimSection:
    name: str = "adamw"                 # adamw | adafactor
    lr: float = 2e-4
    min_lr: float = 0.0                 # end value of the cosine / linear decay
    schedule: str = "cosine"            # cosine | linear | constant (each after linear warmup)
    warmup_steps: int = 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0           # decoupled; never applied to norms or biases
    clip_norm: Optional[float] = 1.0    # global-norm clipping; None disables
    skip_nonfinite: bool = False

    def __post_init__(self):
        _choice("optim.name", self.name, ("adamw", "adafactor"))
        _choice("optim.schedule", self.schedule, ("cosine", "linear", "constant"))
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        for key in ("b1", "b2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"optim.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ConfigError(f"optim.clip_norm must be > 0 or null, got {self.clip_norm}")


@dataclass(frozen=True)
class LoraSection:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0                 # adapter output scaled by alpha / rank
    dropout: float = 0.0                # on the adapter input only
    # Module-name patterns (fnmatch on the last path component, or on the full dotted path
    # when the pattern contains a dot). "experts" wraps every Mixtral expert projection,
    # "block_sparse_moe.gate" the router.
    targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    quantize: Optional[str] = None      # None | int8 | nf4  (QLoRA base weights; medjax/quant/)
    quant_block: int = 64               # nf4 block size along the contracting dim
    double_quant: bool = False          # nf4: quantize the block scales too (QLoRA paper)

    def __post_init__(self):
        if self.quantize is not None and not self.enabled:
            raise ConfigError("lora.quantize needs lora.enabled=true (QLoRA trains adapters on a "
                              "quantized base)")
        if self.quant_block < 2 or self.quant_block % 2:
            raise ConfigError(f"lora.quant_block must be an even number >= 2, got {self.quant_block}")
        if self.enabled:
            _positive("lora.rank", self.rank)
            _positive("lora.alpha", self.alpha)
            if not self.targets:
                raise ConfigError("lora.targets must name at least one module pattern")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.quantize is not None:
            _choice("lora.quantize", self.quantize, ("int8", "nf4"))


@dataclass(frozen=True)
class MeshSection:
    """Device mesh (see medjax/sharding.py, docs/SCALE.md) and multi-process launch settings.

    Axis sizes: None = preset default (the preset's main axis takes the rest: data for dp,
    fsdp otherwise; other axes 1), -1 = the rest of the devices, N = exactly N.
    """
    preset: str = "dp"                  # dp | fsdp | fsdp_tp | fsdp_ep
    data: Optional[int] = None
    fsdp: Optional[int] = None
    tensor: Optional[int] = None
    expert: Optional[int] = None
    stage: int = 1                      # pipeline stages over the layer stack (any preset)
    dcn_data: int = 1                   # slices (TPU) / hosts the data axis spans over DCN
    # jax.distributed; unset = from env (MEDJAX_COORDINATOR, ...), SLURM or TPU auto-detection
    coordinator: Optional[str] = None   # host:port of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None

    def __post_init__(self):
        from medjax.sharding import PRESET_AXES     # the one table of presets
        _choice("mesh.preset", self.preset, tuple(PRESET_AXES))
        for axis in ("data", "fsdp", "tensor", "expert"):
            size = getattr(self, axis)
            if size is not None and size != -1 and size < 1:
                raise ConfigError(f"mesh.{axis} must be -1 (the rest), None or >= 1, got {size}")
        rest = [a for a in ("data", "fsdp", "tensor", "expert") if getattr(self, a) == -1]
        if len(rest) > 1:
            raise ConfigError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + a for a in rest)}")
        allowed = PRESET_AXES[self.preset]
        for axis in ("fsdp", "tensor", "expert"):
            size = getattr(self, axis)
            if axis not in allowed and size is not None and size != 1:
                raise ConfigError(f"mesh.{axis}={size} is unused by mesh.preset={self.preset!r}; "
                                  f"set it to 1 or pick a preset that uses it")
        _positive("mesh.dcn_data", self.dcn_data)
        _positive("mesh.stage", self.stage)
        if self.num_processes is not None:
            _positive("mesh.num_processes", self.num_processes)
        if self.process_id is not None and not (
                0 <= self.process_id < (self.num_processes or self.process_id + 1)):
            raise ConfigError(f"mesh.process_id={self.process_id} must be in [0, mesh.num_processes)")


@dataclass(frozen=True)
class CheckpointSection:
    dir: Optional[str] = None           # default: <train.out_dir>/checkpoints
    every: int = 100                    # save every N optimizer steps (0: only at the end)
    keep: int = 3                       # keep the last K checkpoints
    async_save: bool = True

    def __post_init__(self):
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be >= 0, got {self.every}")
        _positive("checkpoint.keep", self.keep)


@dataclass(frozen=True)
class EvalSection:
    tasks: tuple = ()
    data_dir: Optional[str] = None
    limit: Optional[int] = None
    before_training: bool = False         # also score the untrained model (eval_before.json)
    num_fewshot: int = 0
    chat_template: Optional[str] = None   # None = plain prompts; "default" = the model's template
    score: str = "letter"                 # letter | full_answer (Med42: likelihood of the option text)
    mode: str = "loglikelihood"           # loglikelihood | generate (greedy answer, letter extracted)
    batch_tokens: int = 4096              # padded tokens per scoring batch
    log_samples: bool = False
    fewshot_as_multiturn: bool = True     # with chat_template: each few-shot example a turn of its own
    max_new_tokens: int = 32              # answer length in mode generate
    truthfulqa_primer: str = "qa"         # qa: the release's six QA pairs first | none

    def __post_init__(self):
        from medjax.eval.truthfulqa import PRIMERS
        _choice("eval.score", self.score, ("letter", "full_answer"))
        _choice("eval.mode", self.mode, ("loglikelihood", "generate"))
        _choice("eval.truthfulqa_primer", self.truthfulqa_primer, tuple(sorted(PRIMERS)))
        _positive("eval.batch_tokens", self.batch_tokens)
        _positive("eval.max_new_tokens", self.max_new_tokens)
        if self.num_fewshot < 0:
            raise ConfigError(f"eval.num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval.limit must be >= 1 or null, got {self.limit}")


@dataclass(frozen=True)
class TrainSection:
    steps: int = 100                    # optimizer steps (each = grad_accum micro-batches)
    epochs: Optional[int] = None        # if set, steps = epochs * batches per epoch
    batch_size: int = 8                 # sequences per optimizer step (split over grad_accum)
    grad_accum: int = 1                 # micro-batches per step (batch_size % grad_accum == 0)
    seed: int = 0
    out_dir: str = "runs/default"       # metrics.jsonl, TensorBoard events, plot, exports
    log_every: int = 1
    aux_loss_coef: float = 0.02         # MoE router load-balancing loss weight
    eval_every: int = 0                 # held-out loss every N steps (0: only before/after)
    eval_batches: int = 4               # held-out batches per evaluation
    export: tuple = ("hf", "peft")      # written to <out_dir>/export/{hf,peft} at the end
    objective: str = "sft"              # sft | dpo (preference pairs; medjax/train/dpo.py)
    neftune_alpha: float = 0.0          # NEFTune noise on input embeddings (Internist.ai: 5); 0 = off
    pipeline_repeats: int = 1           # circular pipeline: passes of each micro-batch over the
                                        # mesh.stage stages (layers split into stage x repeats)
    recipe: Optional[str] = None        # the published recipe a config reproduces (docs/RECIPES.md)

    def __post_init__(self):
        _choice("train.objective", self.objective, ("sft", "dpo"))
        if self.neftune_alpha < 0:
            raise ConfigError(f"train.neftune_alpha must be >= 0, got {self.neftune_alpha}")
        _positive("train.steps", self.steps)
        _positive("train.batch_size", self.batch_size)
        _positive("train.grad_accum", self.grad_accum)
        _positive("train.log_every", self.log_every)
        _positive("train.pipeline_repeats", self.pipeline_repeats)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be divisible by "
                              f"train.grad_accum ({self.grad_accum})")
        if self.aux_loss_coef < 0:
            raise ConfigError(f"train.aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
        for name in self.export:
            _choice("train.export", name, ("hf", "peft"))


@dataclass(frozen=True)
class DpoSection:
    """Direct preference optimisation (``train.objective=dpo``; medjax/train/dpo.py)."""
    beta: float = 0.1                   # strength of the KL anchor to the reference model
    label_smoothing: float = 0.0        # conservative DPO: assumed fraction of flipped labels
    reference: str = "auto"             # auto: LoRA → base with adapters off; full FT → frozen copy

    def __post_init__(self):
        _positive("dpo.beta", self.beta)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        _choice("dpo.reference", self.reference, ("auto", "adapters_off", "frozen_copy"))


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    lora: LoraSection = field(default_factory=LoraSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    train: TrainSection = field(default_factory=TrainSection)
    dpo: DpoSection = field(default_factory=DpoSection)

    def __post_init__(self):
        """The checks that span sections (each section has already checked itself)."""
        formats = {self.data.format} | {s["format"] for s in self.data.sources if "format" in s}
        if self.train.objective == "dpo" and formats != {"preference"}:
            raise ConfigError(f"train.objective=dpo needs data.format=preference (every source), "
                              f"got {sorted(formats)}")
        if self.train.objective != "dpo" and "preference" in formats:
            raise ConfigError(f"data.format=preference holds chosen/rejected pairs: it needs "
                              f"train.objective=dpo, got train.objective={self.train.objective}")
        if self.dpo.reference == "adapters_off" and not self.lora.enabled:
            raise ConfigError("dpo.reference=adapters_off needs lora.enabled=true (full fine-tuning "
                              "has no adapters to switch off; use dpo.reference=frozen_copy)")
        # The global batch is split over data × fsdp × expert (medjax.ops.target.BATCH_AXES), and
        # over processes: sizes fixed in the config must divide it (None / -1 are known only
        # once the devices are, and are checked then).
        from medjax.ops.target import BATCH_AXES
        fixed = {a: getattr(self.mesh, a) for a in BATCH_AXES
                 if getattr(self.mesh, a) not in (None, -1)}
        shards = math.prod(fixed.values())
        if self.train.batch_size % shards:
            axes = " × ".join(f"mesh.{a}={n}" for a, n in fixed.items())
            raise ConfigError(f"train.batch_size={self.train.batch_size} is not divisible by "
                              f"{axes} (the batch is split over these axes)")
        if self.data.decontaminate and self.eval.data_dir is None:
            raise ConfigError("data.decontaminate needs eval.data_dir (the directory with the "
                              "benchmark test files whose items it removes from the training data)")
        self._check_pipeline()
        processes = self.mesh.num_processes
        if processes and self.train.batch_size % processes:
            raise ConfigError(f"train.batch_size={self.train.batch_size} is not divisible by "
                              f"mesh.num_processes={processes} (each process loads its share)")

    def _check_pipeline(self) -> None:
        """mesh.stage / train.pipeline_repeats against the rest (medjax/models/pipeline.py); the
        layer count is checked where it is known (``sharding.check_model``)."""
        stages, repeats = self.mesh.stage, self.train.pipeline_repeats
        if stages == 1:
            if repeats != 1:
                raise ConfigError(f"train.pipeline_repeats={repeats} needs mesh.stage > 1")
            return
        if self.train.grad_accum < stages:
            raise ConfigError(f"train.grad_accum={self.train.grad_accum} micro-batches are fewer "
                              f"than mesh.stage={stages} pipeline stages (each stage needs a "
                              f"micro-batch in flight; raise train.grad_accum)")
        if not self.model.scan_layers:
            raise ConfigError(f"mesh.stage={stages} pipelines the stacked layers: it needs "
                              f"model.scan_layers=true")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- helpers
def _choice(key, value, options):
    if value not in options:
        raise ConfigError(f"{key}: {value!r} is not one of {list(options)}")


def _positive(key, value):
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def did_you_mean(name, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(sorted(options))})"
