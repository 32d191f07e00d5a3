"""The closed loop (``cai loop``): red-team the policy, turn what got through into the next round's CAI data,
retrain, and measure again on a held-out attack set (see :mod:`cai_async.loop.rounds`)."""

from cai_async.loop.config import LOOP_KEY, LoopConfig, load_loop_recipe
from cai_async.loop.report import loop_columns, loop_rows, write_loop_report
from cai_async.loop.rounds import STEPS, run_loop

__all__ = ["LOOP_KEY", "STEPS", "LoopConfig", "load_loop_recipe", "loop_columns", "loop_rows", "run_loop",
           "write_loop_report"]
