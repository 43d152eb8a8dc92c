"""Vision token matching between an efficient student and a vanilla teacher (SPEC §2)."""

from emkd.matching.cost import l1_cost
from emkd.matching.hungarian import hungarian_match
from emkd.matching.pairing import MATCHINGS, VisionPairs, pair_vision_tokens

__all__ = ["MATCHINGS", "VisionPairs", "hungarian_match", "l1_cost", "pair_vision_tokens"]
