"""Pipeline configuration: YAML + `key=value` overrides -> one validated PipelineConfig.

- `sections`: the pydantic sections and `PipelineConfig` (with its phase plan);
- `loading`: overrides, paths, validation into one-line `ConfigError`s, YAML out;
- `changes`: which fields may change when a run is continued (marked on the fields).
"""

from pipeline.config.changes import RESUMABLE_CHANGES, changed_since, config_differences
from pipeline.config.loading import (
    PATH_KEYS,
    absolute_paths,
    config_yaml,
    describe,
    dump_config,
    int_keys,
    is_uri,
    load_config,
    load_config_dict,
    merge,
    nested,
    parse_overrides,
    read_yaml_mapping,
    validate_config,
)
from pipeline.config.sections import (
    BUILTIN_SAMPLE_FACES,
    DataConfig,
    EvalSection,
    PipelineConfig,
    PrepareSection,
    RunSection,
    ScalingSection,
    TrackingSection,
)
from preprocessing.config import ConfigError

__all__ = [
    "BUILTIN_SAMPLE_FACES",
    "PATH_KEYS",
    "RESUMABLE_CHANGES",
    "ConfigError",
    "DataConfig",
    "EvalSection",
    "PipelineConfig",
    "PrepareSection",
    "RunSection",
    "ScalingSection",
    "TrackingSection",
    "absolute_paths",
    "changed_since",
    "config_differences",
    "config_yaml",
    "describe",
    "dump_config",
    "int_keys",
    "is_uri",
    "load_config",
    "load_config_dict",
    "merge",
    "nested",
    "parse_overrides",
    "read_yaml_mapping",
    "validate_config",
]
