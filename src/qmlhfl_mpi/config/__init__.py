"""The run configuration: frozen dataclasses, YAML loading and strict validation
(:mod:`.schema`), and the edge where a config becomes runtime objects (:mod:`.build`)."""
from __future__ import annotations

from .schema import (
                     RESUME_FREE_KEYS,
                     Config,
                     ConfigError,
                     apply_overrides,
                     callback_specs,
                     config_diff,
                     flatten,
                     from_dict,
                     input_files,
                     load,
                     load_config,
                     schema,
                     validate,
)

__all__ = ["Config", "ConfigError", "RESUME_FREE_KEYS", "apply_overrides", "callback_specs", "config_diff", "input_files",
           "flatten", "from_dict", "load", "load_config", "schema", "validate"]
