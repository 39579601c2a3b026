"""Packing planner: load-balanced assignment of variable-length samples to (step, rank) packs.

    plan_steps(lengths, capacity=, ranks=, hidden_size=, window=16) -> Plan   (packdit.packing.planner)
    CostModel(a, b, c), calibrate(fn_or_model, device)                        (packdit.packing.cost)
    baselines: pad_to_batch_max, pad_to_max, shape_buckets, shape_buckets_lookahead, navit_greedy,
               per_step_lpt; STRATEGIES maps their benchmark names to them   (packdit.packing.baselines)
"""

from packdit.packing.cost import Calibration, CostModel, calibrate
from packdit.packing.planner import Plan, PlanStats, implementation, plan_steps

__all__ = ["Plan", "PlanStats", "plan_steps", "implementation", "CostModel", "Calibration", "calibrate"]
