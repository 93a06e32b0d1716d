"""CPU path of fused_linear_logprobs and of the single sweep of the losses: chunks of rows, each
chunk's logits [rows, V] made by one matrix product, reduced by the C++ vocabulary pass (backend "cpp") or by plain
torch ops (backend "torch"), then freed.

fused_linear_logprobs: forward 2NDV FLOP; backward recomputes the logits (2NDV) and does the two gradient products
(4NDV). ``forward_and_gradients`` (the losses): 6NDV, each chunk's logits turned into their gradient in place.
"""

import torch

from dypo_kernels.backend import cpu_extension

# Per-token gradient coefficients smaller than this are taken as 0 (on every backend). Below it their products with
# the softmax are subnormal floats, which x86 CPUs multiply about a hundred times slower (seen: a saturated GAL
# sigmoid made a whole backward 40x slower); next to any other token's contribution they are below fp32 resolution.
NEGLIGIBLE_COEFFICIENT = 1e-30


def flush_negligible(coefficients):
    return torch.where(coefficients.abs() < NEGLIGIBLE_COEFFICIENT, 0.0, coefficients)

LOGITS_CHUNK_BYTES = 128 * 2**20  # one chunk of fp32 logits; bounds the extra memory independently of N


def rows_per_chunk(vocab_size: int) -> int:
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))


def _chunk_logits(hidden_chunk, weight32, bias32, inv_temperature):
    z = hidden_chunk.float() @ weight32.T
    if bias32 is not None:
        z += bias32
    return z.mul_(inv_temperature)


# The plain torch passes work in place on the logits chunk and keep one more chunk-sized buffer. Clamping the
# shifted logits at -1e30 keeps e * shifted = 0 where a logit is -inf (0 * -inf would be NaN), and lets NaN through.
# The forward pass leaves z shifted by its row max, which it returns last.
def _vocab_forward_torch(z, targets):
    target_logit = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    row_max = z.max(-1, keepdim=True).values
    shifted = z.sub_(row_max)
    e = shifted.exp()
    sum_exp = e.sum(-1)
    sum_exp_shifted = e.mul_(shifted.clamp_(min=-1e30)).sum(-1)
    log_sum = sum_exp.log()
    return row_max.squeeze(-1) + log_sum, target_logit, log_sum - sum_exp_shifted / sum_exp, row_max.squeeze(-1)


def _vocab_backward_torch(z, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature):
    log_p = z.sub_(lse.unsqueeze(-1))
    p = log_p.exp()
    coef_logp = (grad_logp * inv_temperature).unsqueeze(-1)
    if grad_entropy is None:
        grad_z = p.mul_(-coef_logp)
    else:
        # z - E_p[z] = log p + entropy
        grad_z = log_p.add_(entropy.unsqueeze(-1)).clamp_(min=-1e30).mul_(p)
        grad_z.mul_(-(grad_entropy * inv_temperature).unsqueeze(-1)).addcmul_(p, coef_logp, value=-1.0)
    return grad_z.scatter_add_(-1, targets.unsqueeze(-1), coef_logp)


def _add_chunk_gradients(grad_z, hidden_chunk, weight32, rows, grad_hidden, grad_weight, grad_bias):
    """The products of one chunk's logit gradient with W and h (4 rows*D*V FLOP), into the buffers that exist."""
    if grad_hidden is not None:
        grad_hidden[rows] = grad_z @ weight32
    if grad_weight is not None:
        grad_weight.addmm_(grad_z.T, hidden_chunk.float())
    if grad_bias is not None:
        grad_bias += grad_z.sum(0)


def forward(hidden, weight, bias, targets, inv_temperature, *, backend):
    """Returns (lse, target_logit, entropy), each fp32 [N], for hidden [N, D]."""
    weight32 = weight.float()
    bias32 = None if bias is None else bias.float()
    ext = cpu_extension() if backend == "cpp" else None
    out = [torch.empty(hidden.shape[0], dtype=torch.float32) for _ in range(3)]
    step = rows_per_chunk(weight.shape[0])
    for start in range(0, hidden.shape[0], step):
        rows = slice(start, start + step)
        z = _chunk_logits(hidden[rows], weight32, bias32, inv_temperature)
        stats = ext.vocab_forward(z, targets[rows]) if ext else _vocab_forward_torch(z, targets[rows])[:3]
        for buffer, value in zip(out, stats):
            buffer[rows] = value
        del z  # free this chunk's logits before the next chunk's are made: one chunk alive at a time
    return tuple(out)


def backward(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, *,
             needs_input_grad, backend):
    """fp32 gradients of sum(grad_logp * logp + grad_entropy * entropy) for hidden, weight, bias (None if not
    needed), whatever the inputs' dtype."""
    needs_hidden, needs_weight, needs_bias = needs_input_grad
    weight32 = weight.float()
    bias32 = None if bias is None else bias.float()
    ext = cpu_extension() if backend == "cpp" else None
    grad_hidden = torch.empty(hidden.shape, dtype=torch.float32) if needs_hidden else None
    grad_weight = torch.zeros_like(weight32) if needs_weight else None
    grad_bias = torch.zeros_like(bias32) if needs_bias else None
    step = rows_per_chunk(weight.shape[0])
    for start in range(0, hidden.shape[0], step):
        rows = slice(start, start + step)
        hidden_chunk = hidden[rows]
        z = _chunk_logits(hidden_chunk, weight32, bias32, inv_temperature)
        g_entropy = None if grad_entropy is None else grad_entropy[rows]
        if ext:
            ext.vocab_backward_(z, targets[rows], lse[rows], entropy[rows], grad_logp[rows], g_entropy,
                                inv_temperature)
            grad_z = z
        else:
            grad_z = _vocab_backward_torch(z, targets[rows], lse[rows], entropy[rows], grad_logp[rows], g_entropy,
                                           inv_temperature)
        _add_chunk_gradients(grad_z, hidden_chunk, weight32, rows, grad_hidden, grad_weight, grad_bias)
        del z, grad_z  # one chunk alive at a time
    return grad_hidden, grad_weight, grad_bias


def forward_and_gradients(hidden, weight, bias, targets, inv_temperature, gradient_of_logps, *, needs_input_grad,
                          backend, chunks=None):
    """The single sweep: per chunk, logits -> (lse, logps, entropy) -> g = gradient_of_logps(rows, logps, entropy)
    -> the chunk's logits overwritten by their gradient g (onehot - p) / T -> its products with W and h.

    Returns (lse, logps, entropy, grad_hidden, grad_weight, grad_bias): the gradients of sum_t L_t(lp_t) where
    g_t = dL_t/dlp_t, fp32, None where not needed. 6NDV FLOP, one chunk of logits alive at a time. ``chunks``: the
    row ranges (start, stop) to take as chunks, in order, each of at most rows_per_chunk rows (None: equal chunks).
    """
    needs_hidden, needs_weight, needs_bias = needs_input_grad
    weight32 = weight.float()
    bias32 = None if bias is None else bias.float()
    ext = cpu_extension() if backend == "cpp" else None
    lse, logps, entropy = (torch.empty(hidden.shape[0], dtype=torch.float32) for _ in range(3))
    grad_hidden = torch.empty(hidden.shape, dtype=torch.float32) if needs_hidden else None
    grad_weight = torch.zeros_like(weight32) if needs_weight else None
    grad_bias = torch.zeros_like(bias32) if needs_bias else None
    if chunks is None:
        step = rows_per_chunk(weight.shape[0])
        chunks = [(start, min(start + step, hidden.shape[0])) for start in range(0, hidden.shape[0], step)]
    for start, stop in chunks:
        rows = slice(start, stop)
        hidden_chunk, targets_chunk = hidden[rows], targets[rows]
        z = _chunk_logits(hidden_chunk, weight32, bias32, inv_temperature)
        if ext:
            lse[rows], target_logit, entropy[rows] = ext.vocab_forward(z, targets_chunk)
        else:
            lse[rows], target_logit, entropy[rows], row_max = _vocab_forward_torch(z, targets_chunk)
        logps[rows] = target_logit - lse[rows]
        grad_logp = flush_negligible(gradient_of_logps(rows, logps[rows], entropy[rows]).float()).contiguous()
        if not any(needs_input_grad):  # under torch.no_grad: the values only
            del z
            continue
        if ext:
            ext.vocab_backward_(z, targets_chunk, lse[rows], entropy[rows], grad_logp, None, inv_temperature)
            grad_z = z
        else:  # z holds z - max: its log-softmax subtracts lse - max
            grad_z = _vocab_backward_torch(z, targets_chunk, lse[rows] - row_max, entropy[rows], grad_logp, None,
                                           inv_temperature)
        _add_chunk_gradients(grad_z, hidden_chunk, weight32, rows, grad_hidden, grad_weight, grad_bias)
        del z, grad_z  # one chunk alive at a time
    return lse, logps, entropy, grad_hidden, grad_weight, grad_bias
