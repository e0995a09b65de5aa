"""The topology algorithms as pure functions on tensors (masks, weights, scores in; masks out).

Initial topologies (``build_mask`` and the builders), link budgets, link removal,
network percolation, CH link prediction, regrowth and sampling; each module's
docstring cites the algorithm it implements. Everything here is importable from
``hf_chts.topology`` directly, e.g. ``from hf_chts.topology import ch_l3n_scores``.
"""

from .bsf import bsf_mask, resort_by_degree
from .budgets import BUDGET_ROUNDINGS, allocate_links, count_links, link_budget
from .ch_scores import CH_VARIANTS, ch3_l3_path_scores, ch_l3n_scores, score_memory_bytes
from .common import as_bool_mask
from .init import (
    BRF_CENTRES, DEGREE_MODES, INIT_METHODS, brf_mask, bsw_mask, build_mask, csti_mask, dense_mask, er_mask,
)
from .percolation import PercolationResult, active_neurons, percolate
from .regrowth import REGROWTH_METHODS, SELECTIONS, regrow, select_candidates
from .removal import delta_to_temperature, prune_to_count, removal_importance, soft_removal
from .sampling import exact_topk, uniform_sample, weighted_sample_without_replacement

__all__ = [
    # initial topologies (init, bsf) and link budgets
    "INIT_METHODS", "DEGREE_MODES", "BRF_CENTRES", "build_mask", "dense_mask", "er_mask", "bsw_mask", "brf_mask",
    "bsf_mask", "csti_mask", "resort_by_degree", "BUDGET_ROUNDINGS", "count_links", "link_budget", "allocate_links",
    # removal
    "removal_importance", "delta_to_temperature", "soft_removal", "prune_to_count",
    # percolation
    "PercolationResult", "percolate", "active_neurons",
    # link prediction and regrowth
    "CH_VARIANTS", "ch_l3n_scores", "ch3_l3_path_scores", "score_memory_bytes", "REGROWTH_METHODS", "SELECTIONS", "regrow",
    "select_candidates",
    # sampling and masks
    "weighted_sample_without_replacement", "uniform_sample", "exact_topk", "as_bool_mask",
]
