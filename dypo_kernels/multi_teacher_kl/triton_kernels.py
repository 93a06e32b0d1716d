"""Triton path of the per-chunk divergence pass of fused_multi_teacher_kl (the math: divergence.py's table).

One program per row of the chunk. It reads the row's student logits and the m teachers' (fp32 products, divided by
the temperature as they are loaded) in blocks of BLOCK_V: (1) the m + 1 log-sum-exps, (2) the divergence and, for
reverse KL and JSD, the row's K = sum q (log q - A) that the gradient needs, (3) the student's logit gradient,
scaled and written into the workspace (the operands' dtype) or over the student's logits. Memory-bound: 3 + 3m reads
and one write of the row; no atomics, deterministic.
"""

import math

import torch
import triton
import triton.language as tl

from dypo_kernels.multi_teacher_kl.divergence import resolve

BLOCK_V = 1024
NUM_WARPS = 8
DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


@triton.jit
def _row_lse(p_row, V, inv_temperature, BLOCK_V: tl.constexpr):
    """(m, s) with log-sum-exp = m + s for one row of V fp32 logits (-inf entries add nothing). Kept apart so that
    log-softmax is formed as (z - m) - s: at low temperatures the logits are large and m + s would round."""
    running_max = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v_start in range(0, V, BLOCK_V):
        o_v = v_start + tl.arange(0, BLOCK_V)
        b_z = tl.load(p_row + o_v, mask=o_v < V, other=float("-inf")) * inv_temperature
        new_max = tl.maximum(running_max, b_z)
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - ref) + tl.exp(b_z - ref)
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    ref = tl.where(row_max == float("-inf"), 0.0, row_max)
    return ref, tl.log(tl.sum(running_sum * tl.exp(running_max - ref), axis=0))


@triton.jit
def _log_add_exp(a, b):
    larger = tl.maximum(a, b)
    ref = tl.where(larger == float("-inf"), 0.0, larger)
    return ref + tl.log(tl.exp(a - ref) + tl.exp(b - ref))


@triton.jit
def _p_log_ratio(log_p, log_other):
    """p (log p - log other), 0 where p = 0 (NaN stays NaN)."""
    p = tl.exp(log_p)
    return tl.where(p == 0.0, 0.0, p * (log_p - log_other))


@triton.jit
def _block_terms(p_teachers, p_coefs, p_teacher_lse, row, rows, V, o_v, m_v, log_q, num_teachers, beta, log_beta,
                 log_one_minus_beta, inv_temperature, DIVERGENCE: tl.constexpr, MIXTURE: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    """For one block of the row: (log P, A, the block's value terms other than (1 - beta) K).
    A is the log-target of the reverse KL / JSD (unused for the forward KL)."""
    log_mix = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    mean_target = tl.zeros([BLOCK_V], dtype=tl.float32)
    mean_value = tl.zeros([BLOCK_V], dtype=tl.float32)
    log_student_part = log_q + log_one_minus_beta
    for i in range(num_teachers):
        coef = tl.load(p_coefs + i)
        if coef > 0.0:
            row_max = tl.load(p_teacher_lse + (2 * i) * rows + row)
            log_sum = tl.load(p_teacher_lse + (2 * i + 1) * rows + row)
            p_row = p_teachers + (i * rows + row).to(tl.int64) * V
            log_p = (tl.load(p_row + o_v, mask=m_v, other=float("-inf")) * inv_temperature - row_max) - log_sum
            log_mix = _log_add_exp(log_mix, log_p + tl.log(coef))
            if not MIXTURE:
                if DIVERGENCE == 0:
                    mean_value += coef * _p_log_ratio(log_p, log_q)
                elif DIVERGENCE == 1:
                    mean_target += coef * log_p
                else:
                    log_m = _log_add_exp(log_p + log_beta, log_student_part)
                    mean_value += coef * beta * _p_log_ratio(log_p, log_m)
                    mean_target += coef * log_m
    if MIXTURE:
        if DIVERGENCE == 0:
            return log_mix, log_mix, _p_log_ratio(log_mix, log_q)
        elif DIVERGENCE == 1:
            return log_mix, log_mix, tl.zeros([BLOCK_V], dtype=tl.float32)
        else:
            log_m = _log_add_exp(log_mix + log_beta, log_student_part)
            return log_mix, log_m, beta * _p_log_ratio(log_mix, log_m)
    return log_mix, mean_target, mean_value


@triton.jit
def _divergence_kernel(p_student, p_teachers, p_coefs, p_teacher_lse, p_value, p_out, rows, V, num_teachers, beta,
                       log_beta, log_one_minus_beta, grad_scale, inv_temperature, DIVERGENCE: tl.constexpr,
                       MIXTURE: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    p_student_row = p_student + row.to(tl.int64) * V
    p_out_row = p_out + row.to(tl.int64) * V
    max_student, log_sum_student = _row_lse(p_student_row, V, inv_temperature, BLOCK_V)
    for i in range(num_teachers):
        row_max, log_sum = _row_lse(p_teachers + (i * rows + row).to(tl.int64) * V, V, inv_temperature, BLOCK_V)
        tl.store(p_teacher_lse + (2 * i) * rows + row, row_max)
        tl.store(p_teacher_lse + (2 * i + 1) * rows + row, log_sum)
    tl.debug_barrier()  # one thread stored each scalar above; every thread reads them below
    value = tl.zeros([BLOCK_V], dtype=tl.float32)
    kl = tl.zeros([BLOCK_V], dtype=tl.float32)  # K = sum q (log q - A), for the reverse KL and JSD
    for v_start in range(0, V, BLOCK_V):
        o_v = v_start + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        log_q = (tl.load(p_student_row + o_v, mask=m_v, other=float("-inf")) * inv_temperature - max_student) - \
            log_sum_student
        log_mix, target, block_value = _block_terms(p_teachers, p_coefs, p_teacher_lse, row, rows, V, o_v, m_v,
                                                    log_q, num_teachers, beta, log_beta, log_one_minus_beta,
                                                    inv_temperature, DIVERGENCE, MIXTURE, BLOCK_V)
        value += tl.where(m_v, block_value, 0.0)
        if DIVERGENCE != 0:
            kl += tl.where(m_v, _p_log_ratio(log_q, target), 0.0)
    row_kl = tl.sum(kl, axis=0)
    if DIVERGENCE == 1:
        scale = 1.0
    else:
        scale = 1.0 - beta
    row_value = tl.sum(value, axis=0)
    if DIVERGENCE != 0:
        row_value += scale * row_kl
    tl.store(p_value + row, row_value)
    for v_start in range(0, V, BLOCK_V):
        o_v = v_start + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        log_q = (tl.load(p_student_row + o_v, mask=m_v, other=float("-inf")) * inv_temperature - max_student) - \
            log_sum_student
        log_mix, target, _ = _block_terms(p_teachers, p_coefs, p_teacher_lse, row, rows, V, o_v, m_v, log_q,
                                          num_teachers, beta, log_beta, log_one_minus_beta, inv_temperature,
                                          DIVERGENCE, MIXTURE, BLOCK_V)
        q = tl.exp(log_q)
        if DIVERGENCE == 0:
            gradient = q - tl.exp(log_mix)
        else:
            gradient = scale * tl.where(q == 0.0, 0.0, q * (log_q - target - row_kl))
        gradient = gradient * grad_scale
        gradient = tl.where(tl.abs(gradient) < 1.1754943508222875e-38, 0.0, gradient)  # no subnormal for the products
        tl.store(p_out_row + o_v, gradient.to(p_out.dtype.element_ty), mask=m_v)


def divergence_pass(student, teachers, coefs, divergence, jsd_beta, aggregate, grad_scale, out, inv_temperature=1.0):
    """Each row's divergence (fp32 [rows]) for the student's fp32 [rows, V] logits and the teachers' (one contiguous
    fp32 [m, rows, V] tensor), all multiplied by ``inv_temperature`` as they are loaded; ``out`` [rows, V] (fp32, bf16
    or fp16, may be ``student``) receives grad_scale times
    the gradient with respect to the student's logits (divergence.py's table), subnormal entries as 0."""
    divergence = resolve(divergence, jsd_beta)
    rows, vocab = student.shape
    coef_tensor = torch.tensor(coefs, dtype=torch.float32, device=student.device)
    teacher_lse = torch.empty(len(teachers), 2, rows, dtype=torch.float32, device=student.device)  # (max, log sum)
    value = torch.empty(rows, dtype=torch.float32, device=student.device)
    beta = jsd_beta if divergence == "jsd" else 0.5  # unused outside jsd; 0.5 keeps its logs finite
    _divergence_kernel[(rows,)](student, teachers, coef_tensor, teacher_lse, value, out, rows, vocab, len(teachers),
                                beta, math.log(beta), math.log1p(-beta), float(grad_scale), float(inv_temperature),
                                DIVERGENCE=DIVERGENCE_CODES[divergence], MIXTURE=aggregate == "mixture",
                                BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return value


def aot_specs():
    """Every (divergence, aggregate) variant, for the ahead-of-time compilation checks (dypo_kernels/aot.py)."""
    signature = {"p_student": "*fp32", "p_teachers": "*fp32", "p_coefs": "*fp32", "p_teacher_lse": "*fp32",
                 "p_value": "*fp32", "p_out": "*bf16", "rows": "i32", "V": "i32:16", "num_teachers": "i32",
                 "beta": "fp32", "log_beta": "fp32", "log_one_minus_beta": "fp32", "grad_scale": "fp32",
                 "inv_temperature": "fp32"}
    return [(f"multi_teacher_kl[{divergence},{'mixture' if mixture else 'mean'}]", _divergence_kernel, signature,
             dict(DIVERGENCE=code, MIXTURE=mixture, BLOCK_V=BLOCK_V), dict(num_warps=NUM_WARPS, num_stages=1))
            for divergence, code in DIVERGENCE_CODES.items() for mixture in (True, False)]
