"""Packing planner: load-balanced assignment of variable-length samples to (step, group of ranks) packs.

    plan_steps(lengths, capacity=, ranks=, hidden_size=, window=16, sp_sizes=(1,)) -> Plan
    Plan.groups / rank_groups(rank) -> Group(first_rank, size, indices); group_blocks(ranks, sp_sizes)
                                                                              (packdit.packing.planner)
    CostModel(a, b, c, alltoall), calibrate(fn_or_model, device)              (packdit.packing.cost)
    baselines: pad_to_batch_max, pad_to_max, shape_buckets, shape_buckets_lookahead, navit_greedy,
               per_step_lpt; STRATEGIES maps their benchmark names to them   (packdit.packing.baselines)
"""

from packdit.packing.cost import Calibration, CostModel, calibrate
from packdit.packing.planner import Group, Plan, PlanStats, group_blocks, implementation, plan_steps

__all__ = ["Plan", "PlanStats", "Group", "plan_steps", "group_blocks", "implementation", "CostModel", "Calibration",
           "calibrate"]
