"""fused_multi_teacher_kl: distillation toward m teachers' next-token distributions over the whole vocabulary,
chunk by chunk, never holding an N x V tensor of the student or of any teacher."""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from dypo_kernels import vocab_pass
from dypo_kernels.amp import follows_autocast
from dypo_kernels.backend import select_backend
from dypo_kernels.custom_ops import traceable_loss
from dypo_kernels.multi_teacher_kl import divergence as torch_pass
from dypo_kernels.multi_teacher_kl.divergence import AGGREGATES, DIVERGENCES
from dypo_kernels.packing import check_offsets
from dypo_kernels.sweep import chunk_logits, loss_chunks, operand, select_impl, sweep_loss
from dypo_kernels.tokens import positions_of
from dypo_kernels.validation import (
    Checks,
    check_choice,
    check_linear_head,
    check_mask_values,
    check_number,
    check_same_device,
    check_temperature,
    check_tensor,
)
from dypo_kernels.vocab_pass.torch_pass import SMALLEST_NORMAL

METRICS = ("num_tokens", "per_token_max")  # the metrics dict of both KL ops


@dataclass
class DenseTeachersPass:
    """The vocabulary pass of fused_multi_teacher_kl: per chunk, each teacher's logits for the chunk's rows (one
    product each, ``teachers`` = (hidden rows [N, D_i], weight operand [V, D_i], bias or None)), then the divergence
    and the student's logit gradient (the backend's divergence pass), scaled by ``loss_scale`` / T. Output: each
    row's divergence ``values`` [N]."""

    teachers: List[tuple]
    coefs: List[float]
    divergence: str
    jsd_beta: float
    aggregate: str
    inv_temperature: float
    backend: str
    loss_scale: float
    values: Optional[torch.Tensor] = None

    def __post_init__(self):
        count = self.teachers[0][0].shape[0]
        self.values = torch.zeros(count, dtype=torch.float32, device=self.teachers[0][0].device)

    @property
    def bytes_per_logit(self):
        """The m + 1 fp32 logits chunks, and the torch pass's temporaries (about 3 chunks)."""
        return 4 * (len(self.teachers) + 1) + (12 if self.backend != "triton" else 0)

    def chunk(self, chunk, logits, workspace):
        teacher_logits = torch.empty((len(self.teachers), *logits.shape), dtype=torch.float32, device=logits.device)
        for i, (hidden, weight, bias) in enumerate(self.teachers):
            chunk_logits(hidden[chunk.rows], weight, bias, out=teacher_logits[i])
        still = vocab_pass.divide_by_temperature(logits, self.inv_temperature, self.backend)
        vocab_pass.divide_by_temperature(teacher_logits, self.inv_temperature, self.backend)
        out = logits if workspace is None else workspace
        self.values[chunk.rows] = divergence_pass(logits, teacher_logits, self.coefs, self.divergence, self.jsd_beta,
                                                  self.aggregate, self.loss_scale * self.inv_temperature, out, still,
                                                  self.backend)
        return workspace

    def total(self):
        return self.values.sum() * self.loss_scale


def divergence_pass(student, teachers, coefs, divergence, jsd_beta, aggregate, grad_scale, out, inv_temperature,
                    backend):
    """Each row's divergence [rows] for logits times ``inv_temperature`` (as vocab_pass.divide_by_temperature
    returns it); ``out`` (fp32, bf16 or fp16 [rows, V]; may be ``student``) receives grad_scale times its gradient
    with respect to the student's logits, subnormal entries as 0."""
    if backend == "triton":
        from dypo_kernels.multi_teacher_kl import triton_kernels

        return triton_kernels.divergence_pass(student, teachers, coefs, divergence, jsd_beta, aggregate, grad_scale,
                                              out, inv_temperature)
    value, gradient = torch_pass.divergence_pass(student, teachers, coefs, divergence, jsd_beta, aggregate)
    gradient.mul_(grad_scale).masked_fill_(gradient.abs() < SMALLEST_NORMAL, 0.0)
    out.copy_(gradient)
    return value


def teacher_operands(teachers):
    """(hidden rows, weight operand, fp32 bias) of each teacher, frozen."""
    return [(hidden, operand(weight.detach()), None if bias is None else bias.detach().float())
            for hidden, weight, bias in teachers]


def packed_checks(cu_seqlens, student_hidden):
    """The Checks of a KL op, with ``cu_seqlens`` checked in them when given (the token mean needs no sequences)."""
    checks = Checks()
    if cu_seqlens is not None:
        if student_hidden.dim() != 2:
            raise ValueError(f"student_hidden must be [N, D] packed rows with cu_seqlens, got shape "
                             f"{tuple(student_hidden.shape)}")
        check_offsets(cu_seqlens, student_hidden.shape[0], student_hidden.device, checks)
    return checks


def kept_rows(flat_student, mask, checks=None):
    """(indices or None, the student's rows [N, D]) of the tokens ``mask`` keeps, after ``checks`` (read here with the
    count: one host sync)."""
    checks = Checks() if checks is None else checks
    check_mask_values(mask, checks)
    if mask is None:
        checks.run()
        return None, flat_student.contiguous()
    flags = mask.reshape(-1).bool()
    count = checks.count(flags.sum())
    checks.run()
    kept = positions_of(flags, count.value)
    return kept, flat_student.index_select(0, kept)


def check_teacher_lists(**lists):
    """Two sequences of per-teacher tensors, by keyword, of one length m >= 1; returns m."""
    (first_name, first), (second_name, second) = lists.items()
    for name, value in lists.items():
        if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list or tuple of tensors, one per teacher; got {type(value).__name__}")
    if len(first) == 0:
        raise ValueError(f"{first_name} must hold at least one teacher (m >= 1); got an empty sequence")
    if len(second) != len(first):
        raise ValueError(f"{first_name} has {len(first)} teachers but {second_name} has {len(second)}")
    return len(first)


def check_student_mask(mask, student_hidden):
    """``mask`` is None or a tensor with student_hidden's leading shape."""
    if mask is not None:
        check_tensor("mask", mask)
        if tuple(mask.shape) != tuple(student_hidden.shape[:-1]):
            raise ValueError(f"mask {tuple(mask.shape)} must have the leading shape of student_hidden "
                             f"{tuple(student_hidden.shape)}")


def check_teacher_coefs(teacher_coefs, count):
    """The m weights w_i as floats (uniform when None): non-negative, summing to 1 within 1e-6."""
    if teacher_coefs is None:
        return [1.0 / count] * count
    coefs = [float(c) for c in (teacher_coefs.tolist() if isinstance(teacher_coefs, torch.Tensor) else teacher_coefs)]
    if len(coefs) != count:
        raise ValueError(f"teacher_coefs has {len(coefs)} weights for {count} teachers")
    if any(not math.isfinite(c) or c < 0 for c in coefs) or abs(sum(coefs) - 1.0) > 1e-6:
        raise ValueError(f"teacher_coefs must be non-negative and sum to 1 (within 1e-6); got {coefs}")
    return coefs


def _check_teachers(student_hidden, student_weight, teacher_hiddens, teacher_weights, teacher_biases, teacher_coefs):
    count = check_teacher_lists(teacher_hiddens=teacher_hiddens, teacher_weights=teacher_weights)
    biases = [None] * count if teacher_biases is None else list(teacher_biases)
    if len(biases) != count:
        raise ValueError(f"teacher_biases has {len(biases)} entries for {count} teachers")
    for i, (hidden, weight, bias) in enumerate(zip(teacher_hiddens, teacher_weights, biases)):
        check_linear_head(hidden, weight, bias, f"teacher_hiddens[{i}]", f"teacher_weights[{i}]",
                          f"teacher_biases[{i}]")
        if tuple(hidden.shape[:-1]) != tuple(student_hidden.shape[:-1]):
            raise ValueError(f"teacher_hiddens[{i}] {tuple(hidden.shape)} must have the leading shape of "
                             f"student_hidden {tuple(student_hidden.shape)} (one row per token)")
        if weight.shape[0] != student_weight.shape[0]:
            raise ValueError(f"teacher_weights[{i}] has a vocabulary of {weight.shape[0]}, the student "
                             f"{student_weight.shape[0]}: all must share one vocabulary")
    return biases, check_teacher_coefs(teacher_coefs, count)


@follows_autocast("student_hidden", "student_weight", "student_bias", "teacher_hiddens", "teacher_weights",
                  "teacher_biases")
@traceable_loss(lambda *args, **kwargs: list(METRICS))
def fused_multi_teacher_kl(student_hidden, student_weight, teacher_hiddens, teacher_weights, *, mask=None,
                           teacher_coefs=None, divergence="forward_kl", jsd_beta=0.5, aggregate="mixture",
                           temperature=1.0, scale_by_temperature_sq=False, student_bias=None, teacher_biases=None,
                           return_metrics=False, cu_seqlens=None, impl=None, chunk_bytes=None):
    """Divergence of the student's next-token distribution from m teachers', over the whole vocabulary, mean over
    the unmasked tokens, never building an N x V tensor.

    q = softmax((W_s h_s + b_s) / T), p_i = softmax((W_i h_i + b_i) / T), weights w_i (``teacher_coefs``).
    "mixture": D(sum_i w_i p_i, q); "mean": sum_i w_i D(p_i, q), where D is KL(p || q) ("forward_kl"), KL(q || p)
    ("reverse_kl") or the generalised JSD beta KL(p || M) + (1 - beta) KL(q || M), M = beta p + (1 - beta) q
    ("jsd", ``jsd_beta``; 0 and 1 give the forward and reverse KL, Liger-Kernel's convention). Forward KL to the
    mixture and the mean of forward KLs differ by a constant and share their gradient. With
    ``scale_by_temperature_sq`` the loss is multiplied by T^2 (Hinton's distillation scaling).

    Args:
        student_hidden: ``[B, T, D_s]`` or ``[N, D_s]`` fp32/bf16/fp16; student_weight ``[V, D_s]``; student_bias
            ``[V]`` or None. Differentiable.
        teacher_hiddens, teacher_weights: sequences of m >= 1 tensors ``[..., D_i]`` (the student's leading shape)
            and ``[V, D_i]``: each teacher its own hidden size, all the student's vocabulary. teacher_biases: None or
            m entries (each ``[V]`` or None). Teachers are frozen: no gradient, no graph kept.
        mask: the leading shape, bool or 0/1: the tokens that count (None: all).
        teacher_coefs: m non-negative weights summing to 1 (within 1e-6); default uniform.
        divergence: "forward_kl", "reverse_kl" or "jsd"; jsd_beta in [0, 1]; aggregate: "mixture" or "mean".
        temperature: positive (0.1 to 10 are tested).
        cu_seqlens: accepted for padding-free callers (every input ``[N, ...]``): checked, and nothing else, since the
            loss is a mean over tokens (no extra host sync).
        return_metrics: also return detached ``{"per_token_max", "num_tokens"}`` (the largest per-token divergence,
            without the T^2 scaling, and the number of tokens).

    Returns:
        the fp32 scalar loss (and the metrics), 0 with zero gradients when no token counts.

    Sweeps: one over the vocabulary for every divergence and aggregate: per chunk of rows, the student's and every
    teacher's logits (one product each), then one pass (a Triton kernel on CUDA, torch on CPU) for the m + 1
    log-sum-exps, the divergence and the student's logit gradient, then its two gradient products; the gradient is
    formed in the forward. FLOP 2N(D_s + sum_i D_i)V + 4N D_s V (teachers with weight 0 are dropped first). Extra
    memory O(N*(D_s + sum_i D_i) + V*(D_s + sum_i D_i) + chunk_bytes): the kept rows of every input, fp32 copies of
    16-bit weights on CPU, and the chunk, which holds the m + 1 fp32 logits chunks (and, on CPU, the pass's
    temporaries). Masked tokens are dropped before any projection. The reverse KL (and the mean of reverse KLs) is
    +inf where a teacher it compares with gives probability 0 to a token the student does not; the other
    divergences stay finite there. One host sync: the input checks and the number of kept tokens. ``impl`` accepts
    "chunked" (the KL has no register-tile kernel); ``chunk_bytes`` as fused_linear_logprobs. Teachers stored as
    top-k log-probs: fused_sparse_teacher_kl.
    """
    check_linear_head(student_hidden, student_weight, student_bias, "student_hidden", "student_weight",
                      "student_bias")
    biases, coefs = _check_teachers(student_hidden, student_weight, teacher_hiddens, teacher_weights,
                                    teacher_biases, teacher_coefs)
    check_student_mask(mask, student_hidden)
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("aggregate", aggregate, AGGREGATES)
    check_number("jsd_beta", jsd_beta, low=0, high=1)
    check_temperature(temperature)
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
                      mask=mask, **{f"teacher_hiddens[{i}]": h for i, h in enumerate(teacher_hiddens)},
                      **{f"teacher_weights[{i}]": w for i, w in enumerate(teacher_weights)},
                      **{f"teacher_biases[{i}]": b for i, b in enumerate(biases)})
    backend = select_backend(student_hidden.device)
    impl = select_impl(impl, backend, student_hidden.device, has_fused=False)
    used = [i for i, c in enumerate(coefs) if c > 0]
    coefs = [coefs[i] for i in used]

    flat_student = student_hidden.reshape(-1, student_hidden.shape[-1])
    kept, kept_student = kept_rows(flat_student, mask, packed_checks(cu_seqlens, student_hidden))
    teachers = []
    for hidden, weight, bias in ((teacher_hiddens[i], teacher_weights[i], biases[i]) for i in used):
        flat = hidden.detach().reshape(-1, hidden.shape[-1])
        teachers.append((flat if kept is None else flat.index_select(0, kept), weight.detach(),
                         None if bias is None else bias.detach()))
    count = kept_student.shape[0]
    loss_scale = (temperature**2 if scale_by_temperature_sq else 1.0) / max(count, 1)
    op_pass = DenseTeachersPass(teacher_operands(teachers), coefs, divergence, float(jsd_beta), aggregate,
                                1.0 / temperature, backend, loss_scale)
    loss = sweep_loss(kept_student, student_weight, student_bias, op_pass,
                      loss_chunks(op_pass, kept_student, student_weight, impl, chunk_bytes), impl)
    if not return_metrics:
        return loss
    return loss, {"num_tokens": count,
                  "per_token_max": op_pass.values.max() if count else torch.zeros((), device=student_hidden.device)}
