"""The per-chunk divergence pass of fused_multi_teacher_kl in plain torch (CPU, and the oracle of the Triton pass).

Inputs are fp32 logits chunks already divided by the temperature: the student's ``[rows, V]`` and the m teachers'.
Returns each row's divergence summed over the vocabulary and its gradient with respect to the student's
(temperature-divided) logits. With q = softmax(student), p_i = softmax(teacher_i), P = sum_i w_i p_i:

| divergence, aggregate    | value                                        | gradient                        |
|--------------------------|----------------------------------------------|---------------------------------|
| forward_kl, mixture      | sum P (log P - log q)                        | q - P                           |
| forward_kl, mean         | sum_i w_i sum p_i (log p_i - log q)          | q - P                           |
| reverse_kl, *            | K = sum q (log q - A)                        | q (log q - A - K)               |
| jsd(beta), mixture       | beta KL(P || M) + (1 - beta) K               | (1 - beta) q (log q - A - K)    |
| jsd(beta), mean          | beta sum_i w_i KL(p_i || M_i) + (1 - beta) K | (1 - beta) q (log q - A - K)    |

A = log P (reverse, mixture), sum_i w_i log p_i (reverse, mean), log M with M = beta P + (1 - beta) q (jsd, mixture;
one M_i = beta p_i + (1 - beta) q per teacher for mean, A = sum_i w_i log M_i). jsd with beta = 0 or 1 is the
forward or reverse KL (Liger-Kernel's convention). Terms with a zero probability factor are 0 (0 log 0 = 0); a row
with a non-finite logit (student or teacher) has a NaN value and gradient.
"""

import math

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
AGGREGATES = ("mixture", "mean")


def resolve(divergence, jsd_beta):
    """The divergence actually computed: jsd at its endpoints is a KL."""
    if divergence == "jsd" and jsd_beta == 0.0:
        return "forward_kl"
    if divergence == "jsd" and jsd_beta == 1.0:
        return "reverse_kl"
    return divergence


def _plogp_ratio(p, log_p, log_other):
    """sum_v p (log p - log other), 0 where p = 0 (a NaN p, from a non-finite logit, stays NaN)."""
    return torch.where(p == 0, 0.0, p * (log_p - log_other)).sum(-1)


def log_softmax_(logits):
    """In place, as (z - max) - log sum exp(z - max): at low temperatures z is large and z - logsumexp would round."""
    logits.sub_(logits.amax(-1, keepdim=True))
    return logits.sub_(logits.exp().sum(-1, keepdim=True).log_())


def log_mixture(teachers):
    """log sum_i w_i p_i from (w_i, log p_i) pairs, in log space (no underflow at low temperatures)."""
    (first_coef, first), *others = teachers
    log_mix = first + math.log(first_coef)
    for w, log_p in others:
        torch.logaddexp(log_mix, log_p + math.log(w), out=log_mix)
    return log_mix


def divergence_pass(student, teachers, coefs, divergence, jsd_beta, aggregate):
    """(value [rows], gradient [rows, V]) for student logits ``[rows, V]`` and the teachers' ``[m, rows, V]``, coefs a
    list of m floats (the weights w_i, zero ones skipped). Works in place on the logits (they are overwritten) to
    keep few chunk-sized buffers alive."""
    divergence = resolve(divergence, jsd_beta)
    log_q = log_softmax_(student)
    q = log_q.exp()
    teachers = [(w, log_softmax_(t)) for w, t in zip(coefs, teachers) if w > 0]
    log_mix = log_mixture(teachers)
    if divergence == "forward_kl":
        mixture = log_mix.exp()
        if aggregate == "mixture":
            value = _plogp_ratio(mixture, log_mix, log_q)
        else:
            value = sum(w * _plogp_ratio(log_p.exp(), log_p, log_q) for w, log_p in teachers)
        return value, q.sub_(mixture)
    value = torch.zeros(student.shape[0], dtype=student.dtype, device=student.device)
    if divergence == "reverse_kl":
        if aggregate == "mixture":
            target = log_mix
        else:
            target = torch.zeros_like(q)
            for w, log_p in teachers:
                target.add_(log_p, alpha=w)
        scale = 1.0
    else:
        beta = jsd_beta
        log_student_part = log_q + math.log(1 - beta)
        if aggregate == "mixture":
            target = torch.logaddexp(log_mix + math.log(beta), log_student_part)
            value = beta * _plogp_ratio(log_mix.exp(), log_mix, target)
        else:
            target = torch.zeros_like(q)
            for w, log_p in teachers:
                log_m = torch.logaddexp(log_p + math.log(beta), log_student_part)
                value = value + w * beta * _plogp_ratio(log_p.exp(), log_p, log_m)
                target.add_(log_m, alpha=w)
        scale = 1 - beta
    kl = _plogp_ratio(q, log_q, target)
    gradient = log_q.sub_(target).sub_(kl[:, None]).mul_(q)  # q (log q - A - K), in the student's buffer
    gradient = torch.where(q == 0, 0.0, gradient if scale == 1.0 else gradient * scale)
    return value + scale * kl, gradient
