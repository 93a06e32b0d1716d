"""dypo-kernels: memory-bounded fused kernels for LLM post-training (DYPO, GRPO, GAL, SFT, multi-teacher KL).

Every ``fused_*`` op takes hidden states and the lm_head weight, never the logits (docs/design.md, "The memory
contract"). Under torch.compile each op is one torch.library custom op (custom_ops.py): no graph break.
"""

from dypo_kernels.advantages import group_advantages
from dypo_kernels.combined import BatchTotals, batch_totals, dypo_loss
from dypo_kernels.gal import fused_gal_loss, gal_coefficients, gal_loss
from dypo_kernels.grade import Grade, GroupAdvantages, Route
from dypo_kernels.grpo import fused_grpo_loss
from dypo_kernels.linear_logprobs import fused_linear_logprobs
from dypo_kernels.multi_teacher_kl import fused_multi_teacher_kl
from dypo_kernels.multi_teacher_kl.sparse import fused_sparse_teacher_kl
from dypo_kernels.sft import fused_sft_loss

__all__ = [
    "BatchTotals", "Grade", "GroupAdvantages", "Route", "batch_totals", "dypo_loss", "fused_gal_loss",
    "fused_grpo_loss", "fused_linear_logprobs", "fused_multi_teacher_kl", "fused_sft_loss", "fused_sparse_teacher_kl",
    "gal_coefficients", "gal_loss", "group_advantages",
]
__version__ = "0.1.0"
