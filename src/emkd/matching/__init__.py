"""Vision token matching between an efficient student and a vanilla teacher (SPEC §2)."""

from emkd.matching.auction import auction_assign
from emkd.matching.cost import MATCHING_DTYPES, head_l1_cost, l1_cost
from emkd.matching.hungarian import BACKENDS, hungarian_match, hungarian_match_batch
from emkd.matching.l1_kernels import BACKENDS as L1_BACKENDS
from emkd.matching.pairing import (
    AUTO_MATCHINGS,
    IVA_MATCHINGS,
    MATCHINGS,
    VisionPairs,
    check_assignment,
    pair_batch,
    pair_indices,
    pair_vision_tokens,
    paired_logits,
    resolve_matching,
)
from emkd.matching.quality import (
    WindowHits,
    batch_window_hits,
    pooling_geometry,
    pooling_windows,
    random_hit_rate,
    window_hit_rate,
)

__all__ = [
    "AUTO_MATCHINGS",
    "BACKENDS",
    "IVA_MATCHINGS",
    "L1_BACKENDS",
    "MATCHINGS",
    "MATCHING_DTYPES",
    "VisionPairs",
    "WindowHits",
    "auction_assign",
    "batch_window_hits",
    "check_assignment",
    "head_l1_cost",
    "hungarian_match",
    "hungarian_match_batch",
    "l1_cost",
    "pair_batch",
    "pair_indices",
    "pair_vision_tokens",
    "paired_logits",
    "pooling_geometry",
    "pooling_windows",
    "random_hit_rate",
    "resolve_matching",
    "window_hit_rate",
]
