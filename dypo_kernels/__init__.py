"""dypo-kernels: memory-bounded fused kernels for LLM post-training (DYPO, GRPO, GAL, SFT, multi-teacher KL).

Every ``fused_*`` op takes hidden states and the lm_head weight, never the logits (DESIGN.md section 2).
"""

from dypo_kernels.advantages import group_advantages
from dypo_kernels.gal import gal_coefficients, gal_loss
from dypo_kernels.grade import Grade, GroupAdvantages
from dypo_kernels.linear_logprobs import fused_linear_logprobs

__all__ = [
    "Grade", "GroupAdvantages", "fused_linear_logprobs", "gal_coefficients", "gal_loss", "group_advantages",
]
__version__ = "0.1.0"
