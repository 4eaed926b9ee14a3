"""Run configuration: frozen dataclass sections (:mod:`.sections`), loaded from YAML with dotted
``key=value`` overrides by :func:`load_config` (:mod:`.load`), ``model=tiny`` (:mod:`.tiny`)."""
from medjax.config.load import (REPLACED_KEYS, apply_overrides, build, config_paths,
                                explicit_steps_win, load_config, merge, mesh_overrides,
                                parse_override, read_yaml)
from medjax.config.sections import (DATA_FIELDS, DATA_FORMATS, CheckpointSection, DataSection,
                                    DpoSection, EvalSection, LoraSection, MeshSection,
                                    ModelSection, OptimSection, RunConfig, TrainSection)
from medjax.config.tiny import (CONFIG_DIR, TINY_DIR, TINY_PRESETS, tiny_data, tiny_overlay,
                                tiny_run_parts)
from medjax.errors import ConfigError

__all__ = ["REPLACED_KEYS", "apply_overrides", "build", "config_paths", "explicit_steps_win",
           "load_config", "merge", "mesh_overrides", "parse_override", "read_yaml",
           "DATA_FIELDS", "DATA_FORMATS", "CheckpointSection", "DataSection", "DpoSection",
           "EvalSection", "LoraSection", "MeshSection", "ModelSection", "OptimSection",
           "RunConfig", "TrainSection", "CONFIG_DIR", "TINY_DIR", "TINY_PRESETS", "tiny_data",
           "tiny_overlay", "tiny_run_parts", "ConfigError"]
