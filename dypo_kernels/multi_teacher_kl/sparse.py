"""fused_sparse_teacher_kl: distillation toward m teachers stored as their top-k token ids and log-probs (the usual
form of offline distillation data), chunk by chunk over the student's vocabulary."""

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from dypo_kernels.amp import follows_autocast
from dypo_kernels.backend import select_backend
from dypo_kernels.custom_ops import traceable_loss
from dypo_kernels.multi_teacher_kl import (
    METRICS,
    check_student_mask,
    check_teacher_coefs,
    check_teacher_lists,
    kept_rows,
    packed_checks,
)
from dypo_kernels.multi_teacher_kl.divergence import log_softmax_
from dypo_kernels.sweep import loss_chunks, select_impl, sweep_loss
from dypo_kernels.validation import (
    check_choice,
    check_linear_head,
    check_same_device,
    check_temperature,
    check_tensor,
)
from dypo_kernels.vocab_pass.torch_pass import SMALLEST_NORMAL

TAILS = ("bucket", "renormalize")
# Stored log-probs are rounded: a teacher's top-k mass may exceed 1 by this much (and a tail below it counts as 0).
MASS_TOLERANCE = 1e-4


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sparse_pass(student, teachers, coefs, tail):
    """(value [rows], gradient [rows, V]) of sum_i w_i KL(p_i || q) for student logits ``[rows, V]`` (divided by
    the temperature) and teachers given as (ids [rows, k], log-probs [rows, k]) pairs.

    "bucket": teacher i is the distribution over its k tokens S_i plus one bucket holding its remaining mass r_i; the
    student is coarse-grained the same way (q_S, and 1 - Q_S for the bucket). KL = sum_S p (log p - log q) +
    r log(r / (1 - Q_S)); gradient q_j - p_j on S_i, q_j (1 - r / (1 - Q_S)) elsewhere. "renormalize": p renormalised
    over S_i, no bucket; gradient q_j - p_j on S_i, q_j elsewhere. Works in place on ``student``.
    """
    log_q = log_softmax_(student)
    q = log_q.exp()
    value = torch.zeros(student.shape[0], dtype=torch.float32, device=student.device)
    rest_coefficient = torch.zeros_like(value)
    corrections = []
    for coef, (ids, logps) in zip(coefs, teachers):
        log_q_top = log_q.gather(1, ids)
        q_top = log_q_top.exp()
        if tail == "renormalize":
            logps = logps - torch.logsumexp(logps, 1, keepdim=True)
        p = logps.exp()
        kl = torch.where(p > 0, p * (logps - log_q_top), 0.0).sum(1)
        if tail == "bucket":
            mass = (1 - p.sum(1)).clamp(min=0)
            mass = torch.where(mass > MASS_TOLERANCE, mass, 0.0)
            log_q_rest = _log1mexp(torch.logsumexp(log_q_top, 1).clamp(max=0))
            kl = kl + torch.where(mass > 0, mass * (mass.log() - log_q_rest), 0.0)
            rest = torch.where(mass > 0, 1 - mass / log_q_rest.exp(), 1.0)
        else:
            rest = torch.ones_like(kl)
        value += coef * kl
        rest_coefficient += coef * rest
        corrections.append((ids, coef * (q_top * (1 - rest[:, None]) - p)))
    gradient = q.mul_(rest_coefficient[:, None])
    for ids, correction in corrections:
        gradient.scatter_add_(1, ids, correction)
    return value, gradient


@dataclass
class SparseTeachersPass:
    """The vocabulary pass of fused_sparse_teacher_kl: per chunk, sparse_pass on the student's logits and the
    teachers' stored (coef, ids [N, k], log-probs [N, k]), its gradient scaled by ``loss_scale`` / T into the
    workspace. Output: each row's divergence ``values`` [N]. A torch pass on every backend."""

    teachers: List[tuple]
    tail: str
    inv_temperature: float
    backend: str
    loss_scale: float
    values: Optional[torch.Tensor] = None

    def __post_init__(self):
        count = self.teachers[0][1].shape[0]
        self.values = torch.zeros(count, dtype=torch.float32, device=self.teachers[0][1].device)

    bytes_per_logit = 12  # the logits and the pass's two temporaries

    def chunk(self, chunk, logits, workspace):
        rows = chunk.rows
        if self.inv_temperature != 1.0:
            logits.mul_(self.inv_temperature)
        value, gradient = sparse_pass(logits, [(ids[rows], logps[rows]) for _, ids, logps in self.teachers],
                                      [coef for coef, _, _ in self.teachers], self.tail)
        self.values[rows] = value
        if workspace is None:
            return None
        gradient.mul_(self.loss_scale * self.inv_temperature).masked_fill_(gradient.abs() < SMALLEST_NORMAL, 0.0)
        return workspace.copy_(gradient)

    def total(self):
        return self.values.sum() * self.loss_scale


def _check_sparse_teachers(student_hidden, vocab_size, teacher_token_ids, teacher_logps, teacher_coefs, checks):
    count = check_teacher_lists(teacher_token_ids=teacher_token_ids, teacher_logps=teacher_logps)
    leading = tuple(student_hidden.shape[:-1])
    for i, (ids, logps) in enumerate(zip(teacher_token_ids, teacher_logps)):
        check_tensor(f"teacher_token_ids[{i}]", ids, integer=True)
        check_tensor(f"teacher_logps[{i}]", logps)
        if tuple(ids.shape[:-1]) != leading or ids.dim() != len(leading) + 1 or ids.shape[-1] < 1:
            raise ValueError(f"teacher_token_ids[{i}] {tuple(ids.shape)} must be the student's leading shape "
                             f"{leading} + (k,), k >= 1")
        if logps.shape != ids.shape or not logps.is_floating_point():
            raise ValueError(f"teacher_logps[{i}] {tuple(logps.shape)} must be float, the shape of its ids "
                             f"{tuple(ids.shape)}")
        if ids.numel() == 0:
            continue
        checks.require(~((ids < 0) | (ids >= vocab_size)).any(),
                       f"teacher_token_ids[{i}] must lie in [0, {vocab_size})")
        ordered = ids.sort(-1).values
        checks.require(~(ordered[..., 1:] == ordered[..., :-1]).any(),
                       f"teacher_token_ids[{i}] repeats a token id within a position")
        checks.require(~(torch.isnan(logps) | (logps > MASS_TOLERANCE)).any(),
                       f"teacher_logps[{i}] must be log-probabilities (<= 0, -inf allowed, no NaN)")
        checks.require(~(logps.float().exp().sum(-1) > 1 + MASS_TOLERANCE).any(),
                       f"teacher_logps[{i}]: a position's top-k probabilities sum to more than 1")
    return check_teacher_coefs(teacher_coefs, count)


@follows_autocast("student_hidden", "student_weight", "student_bias")
@traceable_loss(lambda *args, **kwargs: list(METRICS))
def fused_sparse_teacher_kl(student_hidden, student_weight, teacher_token_ids, teacher_logps, *, mask=None,
                            teacher_coefs=None, tail="bucket", temperature=1.0, student_bias=None,
                            return_metrics=False, cu_seqlens=None, impl=None, chunk_bytes=None):
    """Forward KL from m sparse teachers, sum_i w_i KL(p_i || q), mean over the unmasked tokens, never building an
    N x V tensor: each teacher is given by its top-k token ids and their log-probs at every position.

    q = softmax((W_s h + b_s) / temperature); the teachers' log-probs are used as stored (produced at whatever
    temperature the data was made with). The mass a teacher puts outside its k tokens is handled by ``tail``:
    "bucket" (default): one extra outcome, compared with the student's mass outside those tokens: the exact KL
    between the two distributions coarse-grained to the k tokens + "the rest" (a lower bound of the full KL; with
    k = V it is the full KL); "renormalize": the teacher's top-k renormalised to sum to 1, the student's full
    distribution compared on those tokens (the usual top-k distillation loss). Tail masses below 1e-4 (rounding of
    stored log-probs) count as 0.

    Args:
        student_hidden: ``[..., D]`` fp32/bf16/fp16, student_weight ``[V, D]``, student_bias ``[V]`` or None.
        teacher_token_ids: m integer tensors ``[..., k_i]`` (the student's leading shape), distinct ids per position.
        teacher_logps: m float tensors of the same shapes, log-probabilities (<= 0; -inf allowed).
        mask, teacher_coefs, temperature, return_metrics, cu_seqlens: as fused_multi_teacher_kl.

    Returns:
        the fp32 scalar loss (and ``{"per_token_max", "num_tokens"}``), differentiable in the student's hidden
        states, weight and bias.

    Cost: one sweep over the student's vocabulary (6N D V FLOP: the student's projection and its two gradient
    products; no teacher projection at all), a chunked torch pass on every device. Extra memory
    O(N*D + V*D + N*sum k_i + chunk_bytes). One host sync (the checks and the token count). ``impl`` accepts
    "chunked"; ``chunk_bytes`` as fused_linear_logprobs.
    """
    check_linear_head(student_hidden, student_weight, student_bias, "student_hidden", "student_weight",
                      "student_bias")
    checks = packed_checks(cu_seqlens, student_hidden)
    coefs = _check_sparse_teachers(student_hidden, student_weight.shape[0], teacher_token_ids, teacher_logps,
                                   teacher_coefs, checks)
    check_student_mask(mask, student_hidden)
    check_choice("tail", tail, TAILS)
    check_temperature(temperature)
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
                      mask=mask, **{f"teacher_token_ids[{i}]": t for i, t in enumerate(teacher_token_ids)},
                      **{f"teacher_logps[{i}]": t for i, t in enumerate(teacher_logps)})
    backend = select_backend(student_hidden.device)
    impl = select_impl(impl, backend, student_hidden.device, has_fused=False)

    kept, kept_student = kept_rows(student_hidden.reshape(-1, student_hidden.shape[-1]), mask, checks)
    teachers = []
    for coef, ids, logps in zip(coefs, teacher_token_ids, teacher_logps):
        if coef == 0:
            continue
        ids, logps = ids.reshape(-1, ids.shape[-1]).long(), logps.detach().reshape(-1, logps.shape[-1]).float()
        teachers.append((coef, ids if kept is None else ids.index_select(0, kept),
                         logps if kept is None else logps.index_select(0, kept)))

    count = kept_student.shape[0]
    op_pass = SparseTeachersPass(teachers, tail, 1.0 / temperature, backend, 1.0 / max(count, 1))
    loss = sweep_loss(kept_student, student_weight, student_bias, op_pass,
                      loss_chunks(op_pass, kept_student, student_weight, impl, chunk_bytes), impl)
    if not return_metrics:
        return loss
    return loss, {"num_tokens": count,
                  "per_token_max": op_pass.values.max() if count else torch.zeros((), device=student_hidden.device)}
