"""Vision token matching between an efficient student and a vanilla teacher (SPEC §2)."""

from emkd.matching.auction import auction_assign
from emkd.matching.cost import MATCHING_DTYPES, head_l1_cost, l1_cost
from emkd.matching.hungarian import BACKENDS, hungarian_match, hungarian_match_batch
from emkd.matching.l1_kernels import BACKENDS as L1_BACKENDS
from emkd.matching.pairing import MATCHINGS, VisionPairs, pair_vision_tokens
from emkd.matching.quality import (
    WindowHits,
    batch_window_hits,
    pooling_geometry,
    pooling_windows,
    random_hit_rate,
    window_hit_rate,
)

__all__ = [
    "BACKENDS",
    "L1_BACKENDS",
    "MATCHINGS",
    "MATCHING_DTYPES",
    "VisionPairs",
    "WindowHits",
    "auction_assign",
    "batch_window_hits",
    "head_l1_cost",
    "hungarian_match",
    "hungarian_match_batch",
    "l1_cost",
    "pair_vision_tokens",
    "pooling_geometry",
    "pooling_windows",
    "random_hit_rate",
    "window_hit_rate",
]
