"""Stages: async functions over rows that call the engine and write Parquet."""

from cai_async.revision import clean_revision
from cai_async.stages.generate import GenerateConfig, run_generate
from cai_async.stages.sl import CHAIN_SCHEMA, EarlyStopConfig, SLConfig, SLReport, run_sl

__all__ = [
    "CHAIN_SCHEMA",
    "EarlyStopConfig",
    "GenerateConfig",
    "SLConfig",
    "SLReport",
    "clean_revision",
    "run_generate",
    "run_sl",
]
