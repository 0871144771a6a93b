"""The job's typed config: sections, one parser (TOML + dotted overrides), checks before any rank starts.

``sections`` declares every field with its doc and limits, ``parse`` reads TOML and command lines
into them, ``checks`` (with ``rules`` for the layout, ``links`` and ``injection``) validates the
whole job. Import from here: ``from plait.config import JobConfig, build_config``.
"""

from plait.config.checks import check_folder, job_world_size, saves_at, torchrun_world_size, validate, validate_lowbw
from plait.config.injection import INJECTIONS, Injection, parse_injection
from plait.config.links import LINK_DIMS, link_emulation, parse_link_values
from plait.config.parse import (
    INT_MAX, SECTIONS, CommandParser, build_config, finite_float, load_toml, reference_markdown, section_fields,
    split_overrides, to_toml,
)
from plait.config.rules import (
    PP_MULTI_STAGE, PP_V_SHAPED, cp_degrees, degrees, pp_stage_layers, resolve_dp, resolved_cp_shard,
    validate_context_parallel,
    validate_experts, validate_model_parallel, workload,
)
from plait.config.sections import (
    CheckpointConfig, CommConfig, DataConfig, JobConfig, LowBWConfig, MemoryConfig, MetricsConfig, ModelConfig, MoEConfig,
    SEED_MAX, ParallelConfig, ResilienceConfig, RunConfig, TrainConfig, config_key, field_spec,
)

__all__ = [
    "INJECTIONS", "INT_MAX", "LINK_DIMS", "PP_MULTI_STAGE", "PP_V_SHAPED", "SECTIONS", "CheckpointConfig", "CommConfig", "CommandParser",
    "DataConfig", "check_folder", "Injection", "JobConfig", "LowBWConfig", "MemoryConfig", "MetricsConfig", "MoEConfig", "ModelConfig",
    "ParallelConfig", "ResilienceConfig", "RunConfig", "SEED_MAX", "TrainConfig", "build_config", "config_key", "cp_degrees", "degrees", "field_spec",
    "finite_float", "job_world_size", "link_emulation", "load_toml", "parse_injection", "parse_link_values", "pp_stage_layers",
    "reference_markdown", "resolve_dp", "resolved_cp_shard", "saves_at", "section_fields", "split_overrides", "to_toml", "torchrun_world_size",
    "validate", "validate_context_parallel", "validate_experts", "validate_lowbw", "validate_model_parallel",
    "workload",
]
