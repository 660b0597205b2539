"""Region/image attention mass per query row, exact, reduced across tensor-parallel shards."""

from megatron_sayo.attention.region_mass import (
    RegionMass,
    RegionMassProbe,
    ScoredMicrobatch,
    image_key_mask,
    indicator_mass_sums,
    local_head_mass_sums,
    probe_state,
    query_row_pairs,
    score_region_mass,
)

__all__ = ["RegionMass", "RegionMassProbe", "ScoredMicrobatch", "image_key_mask", "indicator_mass_sums",
           "local_head_mass_sums", "probe_state", "query_row_pairs", "score_region_mass"]
