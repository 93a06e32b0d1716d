"""dypo-kernels: memory-bounded fused kernels for LLM post-training (DYPO, GRPO, GAL, SFT, multi-teacher KL).

Every ``fused_*`` op takes hidden states and the lm_head weight, never the logits (DESIGN.md section 2).
"""

from dypo_kernels.grade import Grade
from dypo_kernels.linear_logprobs import fused_linear_logprobs

__all__ = ["Grade", "fused_linear_logprobs"]
__version__ = "0.1.0"
