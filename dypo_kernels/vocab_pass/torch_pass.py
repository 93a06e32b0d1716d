"""The vocabulary pass in plain torch: the fallback where the C++ extension cannot be built, and the readable
statement of what the C++ and Triton passes compute. It keeps two chunk-sized temporaries alive."""

import torch

SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def row_stats(logits, targets):
    """(lse, target_logit, entropy) fp32 [R] of fp32 logits [R, V]: logsumexp(z), z[y], lse - E_softmax(z)[z]."""
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    row_max = logits.amax(1)
    ref = torch.where(torch.isneginf(row_max), 0.0, row_max)  # a row of -inf keeps a finite reference point
    shifted = logits - ref[:, None]
    e = shifted.exp()
    sum_exp = e.sum(1)
    # -inf logits: e = 0, and 0 * -inf would be NaN; NaN logits pass through
    sum_exp_shifted = e.mul_(shifted.clamp_(min=-1e30)).sum(1)
    log_sum = sum_exp.log()
    return ref + log_sum, target_logit, log_sum - sum_exp_shifted / sum_exp


def logit_gradient(logits, targets, lse, entropy, coef_logp, coef_entropy, out):
    """out = coef_logp (onehot(y) - p) - coef_entropy p (z - E_p[z]) with p = softmax(z), fp32, rounded once into
    ``out`` (fp32, bf16 or fp16 [R, V]; may be ``logits``); values below fp32's smallest normal are written as 0."""
    log_p = logits - lse[:, None]
    p = log_p.exp()
    if coef_entropy is None:
        del log_p
        gradient = p.mul_(-coef_logp[:, None])
    else:  # z - E_p[z] = log p + entropy; clamped so that p = 0 next to log p = -inf gives 0, not NaN
        centred = log_p.add_(entropy[:, None]).clamp_(min=-1e30).mul_(p).mul_(coef_entropy[:, None])
        gradient = p.mul_(-coef_logp[:, None]).sub_(centred)
        del centred
    gradient.scatter_add_(1, targets[:, None], coef_logp[:, None])
    gradient.masked_fill_(gradient.abs() < SMALLEST_NORMAL, 0.0)
    return out.copy_(gradient)
