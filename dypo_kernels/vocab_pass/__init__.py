"""The per-chunk vocabulary pass of the sweep engine (dypo_kernels/sweep.py) for every log-prob op: the row
statistics of a chunk of fp32 logits, and the logit gradient of per-row coefficients, in one backend each.

| backend  | implementation                                     | per logit                                       |
|----------|----------------------------------------------------|-------------------------------------------------|
| "triton" | triton_pass.py, one program per row (CUDA)         | stats 4 B read; gradient 4 B read + its write   |
| "cpp"    | csrc/vocab_pass.cpp, vectorised, OpenMP over rows  | the same, the gradient written over the logits  |
| "torch"  | torch_pass.py                                      | a few chunk-sized temporaries                   |

Every backend writes 0 where a gradient entry would be subnormal (below 2^-126): far below fp32 resolution next to
the row's other entries, and x86 CPUs multiply subnormals about a hundred times slower in the products that follow.
"""

from dypo_kernels.backend import cpu_extension
from dypo_kernels.vocab_pass import torch_pass


def divide_by_temperature(logits, inv_temperature, backend):
    """The factor the passes still apply to ``logits`` (the products, fp32 [R, V]) to make z: the Triton passes
    divide as they load (no extra pass over the chunk); on CPU the chunk is divided here, in place."""
    if backend == "triton" or inv_temperature == 1.0:
        return inv_temperature
    logits.mul_(inv_temperature)
    return 1.0


def row_stats(logits, targets, inv_temperature, backend):
    """(lse, target_logit, entropy), fp32 [R], of z = logits * inv_temperature (logits fp32 [R, V], contiguous;
    ``inv_temperature`` as divide_by_temperature returns it) and int64 targets [R] in [0, V): lse = logsumexp(z),
    target_logit = z[y], entropy = lse - sum_v softmax(z)_v z_v."""
    if backend == "triton":
        from dypo_kernels.vocab_pass import triton_pass

        return triton_pass.row_stats(logits, targets, inv_temperature)
    if backend == "cpp":
        return tuple(cpu_extension().vocab_forward(logits, targets))
    return torch_pass.row_stats(logits, targets)


def logit_gradient(logits, targets, lse, entropy, coef_logp, coef_entropy, out, inv_temperature, backend):
    """Fills ``out`` [R, V] (fp32, bf16 or fp16; may be ``logits`` itself) with
    coef_logp (onehot(y) - p) - coef_entropy p (z - E_p[z]), p = softmax(z), z = logits * inv_temperature, formed in
    fp32 and rounded once; ``coef_entropy`` may be None. This is the gradient of sum_r coef_logp_r lp_r +
    coef_entropy_r H_r with respect to z. Returns ``out``."""
    if backend == "triton":
        from dypo_kernels.vocab_pass import triton_pass

        return triton_pass.logit_gradient(logits, targets, lse, entropy, coef_logp, coef_entropy, out,
                                          inv_temperature)
    if backend == "cpp":
        if out is not logits:
            raise ValueError("the C++ vocabulary pass writes its gradient over the logits: out must be logits")
        cpu_extension().vocab_gradient_(logits, targets, lse, entropy, coef_logp, coef_entropy)
        return logits
    return torch_pass.logit_gradient(logits, targets, lse, entropy, coef_logp, coef_entropy, out)
