"""Stages: async functions over rows that call the engine and write Parquet."""

from cai_async.stages.generate import GenerateConfig, run_generate

__all__ = ["GenerateConfig", "run_generate"]
