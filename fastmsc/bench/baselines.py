"""Extra baselines some ops are also measured against (backend ``naive`` of ``fastmsc bench``).

Each is what a user might write by hand, with nothing fused: the ``torch`` backend stays the stronger
baseline every speed-up is quoted against.
"""

from __future__ import annotations

from ..ops.attention import softmax_attention

# attention: softmax(q kᵀ · scale) v in the input dtype, the T x T scores materialised.
NAIVE = {"attention": softmax_attention}
