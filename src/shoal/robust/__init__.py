"""Byzantine-robust aggregation as stages of the aggregation pipeline.

* streaming stages (memory O(model)): :class:`NormBound` (fixed or adaptive L2 bound) and
  :class:`CenteredClipping` (Karimireddy et al., ICML 2021);
* a sum rule that holds the round's updates (memory O(updates x model)): :class:`HeldRule`
  for the coordinate-wise median and trimmed mean (Yin et al., ICML 2018), Krum and
  Multi-Krum (Blanchard et al., NeurIPS 2017) and Bulyan (El Mhamdi et al., ICML 2018),
  each refusing a round that breaks its assumption with :class:`AssumptionBroken`.

The rules themselves are pure functions of an ``(n, d)`` matrix in :mod:`shoal.robust.rules`.
"""

from __future__ import annotations

from shoal.robust.clipping import CenteredClipping, NormBound, NormState, clip_rows
from shoal.robust.held import AssumptionBroken, HeldRule, byzantine_count
from shoal.robust.rules import RULES, requirement

__all__ = ["AssumptionBroken", "CenteredClipping", "HeldRule", "NormBound", "NormState",
           "RULES", "byzantine_count", "clip_rows", "requirement"]
