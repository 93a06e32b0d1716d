"""fused_multi_teacher_kl: distillation toward m teachers' next-token distributions over the whole vocabulary,
chunk by chunk, never holding an N x V tensor of the student or of any teacher."""

import math
from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

from dypo_kernels.backend import select_backend
from dypo_kernels.multi_teacher_kl import divergence as torch_pass
from dypo_kernels.multi_teacher_kl.divergence import AGGREGATES, DIVERGENCES
from dypo_kernels.validation import check_choice, check_linear_head, check_number, check_same_device, \
    check_temperature, check_tensor

# All m + 1 logits chunks of one step together take at most this much (fp32); the pass adds a few more of them.
CHUNK_BYTES = {"cpu": 128 * 2**20, "cuda": 512 * 2**20}


def _rows_per_chunk(device, vocab_size, num_teachers):
    return max(1, CHUNK_BYTES[device.type] // (4 * vocab_size * (num_teachers + 1)))


def _matmul_operand(tensor):
    """CPU products run in fp32; CUDA ones in the inputs' dtype (tensor cores, fp32 accumulation)."""
    return tensor if tensor.device.type == "cuda" else tensor.float()


def _fp32_product(a, b):
    """a @ b with an fp32 result. For 16-bit CUDA operands, torch.mm's out_dtype (torch >= 2.8) keeps the fp32
    accumulator instead of rounding the product to 16 bits; older torch rounds, then widens."""
    if a.dtype == torch.float32:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return (a @ b).float()


def _chunk_logits(hidden, weight, bias, inv_temperature, out=None):
    """fp32 [rows, V] logits / T (into ``out`` if given), for ``weight`` already a matmul operand."""
    hidden = _matmul_operand(hidden)
    if out is not None and hidden.dtype == torch.float32:
        logits = torch.matmul(hidden, weight.T, out=out)
    else:
        logits = _fp32_product(hidden, weight.T)
        logits = logits if out is None else out.copy_(logits)
    if bias is not None:
        logits += bias.float()
    return logits.mul_(inv_temperature)


def _divergence_pass(backend):
    if backend == "triton":
        from dypo_kernels.multi_teacher_kl import triton_kernels

        return triton_kernels.divergence_pass
    return torch_pass.divergence_pass


def dense_teachers_pass(teachers, coefs, settings, backend):
    """The chunk pass of fused_multi_teacher_kl: each teacher's logits for the chunk's rows, then the divergence."""
    divergence, jsd_beta, aggregate, inv_temperature = settings
    divergence_pass = _divergence_pass(backend)
    teachers = [(h, _matmul_operand(w), b) for h, w, b in teachers]

    def chunk_pass(rows, student_logits):
        teacher_logits = torch.empty((len(teachers), *student_logits.shape), dtype=torch.float32,
                                     device=student_logits.device)
        for i, (hidden, weight, bias) in enumerate(teachers):
            _chunk_logits(hidden[rows], weight, bias, inv_temperature, out=teacher_logits[i])
        return divergence_pass(student_logits, teacher_logits, coefs, divergence, jsd_beta, aggregate)

    return chunk_pass


def _sweep(student_hidden, student_weight, student_bias, inv_temperature, chunk_pass, buffers_per_row,
           needs_input_grad):
    """Value sum over rows of the per-token divergence, and the fp32 gradients of that sum (hidden, weight, bias).

    One sweep over the vocabulary: per chunk of rows, the student's logits, then ``chunk_pass(rows, logits)``, which
    gives each row's divergence and the gradient with respect to the logits, then the gradient's products with W
    and h. ``buffers_per_row``: how many V-long fp32 rows the pass holds per row (sizes the chunk)."""
    needs_hidden, needs_weight, needs_bias = needs_input_grad
    count = student_hidden.shape[0]
    device = student_hidden.device
    values = torch.zeros(count, dtype=torch.float32, device=device)
    grad_hidden = torch.zeros(student_hidden.shape, dtype=torch.float32, device=device) if needs_hidden else None
    grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=device) if needs_weight else None
    grad_bias = torch.zeros(student_weight.shape[0], dtype=torch.float32, device=device) if needs_bias else None
    student_operand = _matmul_operand(student_weight)
    step = _rows_per_chunk(device, student_weight.shape[0], buffers_per_row - 1)
    for start in range(0, count, step):
        rows = slice(start, start + step)
        hidden_chunk = student_hidden[rows]
        student_logits = _chunk_logits(hidden_chunk, student_operand, student_bias, inv_temperature)
        values[rows], grad_logits = chunk_pass(rows, student_logits)
        del student_logits
        grad_logits = grad_logits.mul_(inv_temperature).to(student_operand.dtype)  # d/d raw logits: a further 1/T
        if needs_hidden:
            grad_hidden[rows] = grad_logits @ student_operand
        if needs_weight:
            if grad_logits.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.T, _matmul_operand(hidden_chunk))
            else:
                grad_weight += _fp32_product(grad_logits.T, hidden_chunk)
        if needs_bias:
            grad_bias += grad_logits.float().sum(0)
        del grad_logits  # one chunk's buffers alive at a time
    return values, (grad_hidden, grad_weight, grad_bias)


class MultiTeacherKLFunction(torch.autograd.Function):
    """Mean over the kept rows of the per-token divergence; the teachers are constants. Gradients are computed in
    the forward (when ``grad_enabled``) and scaled in the backward."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, inv_temperature, chunk_pass, buffers_per_row,
                loss_scale, grad_enabled):
        needs = tuple(need and grad_enabled for need in ctx.needs_input_grad[:3])
        values, grads = _sweep(student_hidden, student_weight, student_bias, inv_temperature, chunk_pass,
                               buffers_per_row, needs)
        ctx.save_for_backward(*(None if g is None else g.mul_(loss_scale) for g in grads))
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (student_hidden, student_weight, student_bias))
        ctx.mark_non_differentiable(values)
        return values.sum() * loss_scale, values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_values):
        grads = tuple(None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(ctx.saved_tensors,
                                                                                        ctx.dtypes))
        return (*grads, None, None, None, None, None)


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


def fused_multi_teacher_kl(student_hidden, student_weight, teacher_hiddens, teacher_weights, *, mask=None,
                           teacher_coefs=None, divergence="forward_kl", jsd_beta=0.5, aggregate="mixture",
                           temperature=1.0, scale_by_temperature_sq=False, student_bias=None, teacher_biases=None,
                           return_metrics=False):
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
        return_metrics: also return detached ``{"per_token_max", "num_tokens"}`` (the largest per-token divergence,
            without the T^2 scaling, and the number of tokens).

    Returns:
        the fp32 scalar loss (and the metrics), 0 with zero gradients when no token counts.

    Sweeps: one over the vocabulary for every divergence and aggregate: the logits of one chunk of rows (fixed,
    independent of N) of the student and of all teachers are formed, reduced, turned into the student's logit
    gradient and freed; the gradient is computed inside the forward. FLOP 2N(D_s + sum_i D_i)V + 4N D_s V (teachers
    with weight 0 are dropped first). Extra memory O(N*(D_s + sum_i D_i) + V*(D_s + sum_i D_i) + chunk*V*(m+1)):
    the kept rows of every input, fp32 copies of 16-bit weights on CPU, and chunks of logits totalling 128 MiB (CPU)
    or 512 MiB (CUDA) plus a few chunk-sized temporaries of the pass. Masked tokens are dropped before any
    projection. The reverse KL (and the mean of reverse KLs) is +inf where a teacher it compares with gives
    probability 0 to a token the student does not; the other divergences stay finite there. CPU: the per-chunk pass
    in torch; CUDA: one Triton kernel per chunk fuses the m + 1 log-sum-exps, the divergence and the student's logit
    gradient. Host syncs: the input checks and the number of kept tokens. Teachers stored as top-k log-probs:
    fused_sparse_teacher_kl.
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
    used = [i for i, c in enumerate(coefs) if c > 0]
    coefs = [coefs[i] for i in used]

    flat_student = student_hidden.reshape(-1, student_hidden.shape[-1])
    if mask is None:
        kept = None
        kept_student = flat_student.contiguous()
    else:
        kept = mask.reshape(-1).bool().nonzero().squeeze(1)
        kept_student = flat_student.index_select(0, kept)
    teachers = []
    for hidden, weight, bias in ((teacher_hiddens[i], teacher_weights[i], biases[i]) for i in used):
        flat = hidden.detach().reshape(-1, hidden.shape[-1])
        teachers.append((flat if kept is None else flat.index_select(0, kept), weight.detach(),
                         None if bias is None else bias.detach()))
    count = kept_student.shape[0]
    loss_scale = (temperature**2 if scale_by_temperature_sq else 1.0) / max(count, 1)
    settings = (divergence, float(jsd_beta), aggregate, 1.0 / temperature)
    loss, per_token = MultiTeacherKLFunction.apply(kept_student, student_weight, student_bias, 1.0 / temperature,
                                                   dense_teachers_pass(teachers, coefs, settings, backend),
                                                   len(teachers) + 1, loss_scale, torch.is_grad_enabled())
    if not return_metrics:
        return loss
    metrics = {"num_tokens": count,
               "per_token_max": per_token.max() if count else torch.zeros((), device=student_hidden.device)}
    return loss, metrics
