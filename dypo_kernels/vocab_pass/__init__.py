"""The per-chunk vocabulary pass of the sweep engine (dypo_kernels/sweep.py) for every log-prob op: the row
statistics of a chunk of fp32 logits, and the logit gradient of per-row coefficients, in one backend each.

| backend  | implementation                                   | reads / writes per logit                  |
|----------|--------------------------------------------------|-------------------------------------------|
| "triton" | triton_pass.py, one program per row (CUDA)       | stats: 4 B read; gradient: 4 B read + the workspace's bytes written |
| "cpp"    | csrc/vocab_pass.cpp, vectorised, OpenMP over rows | the same, the gradient in place            |
| "torch"  | torch_pass.py                                    | a few chunk-sized temporaries              |

Every backend writes 0 where a gradient entry would be subnormal (below 2^-126): far below fp32 resolution next to
the row's other entries, and x86 CPUs multiply subnormals about a hundred times slower in the products that follow.
"""

from dypo_kernels.backend import cpu_extension
from dypo_kernels.vocab_pass import torch_pass


def row_stats(logits, targets, backend):
    """(lse, target_logit, entropy), fp32 [R], of fp32 logits [R, V] (contiguous) and int64 targets [R] in [0, V):
    lse = logsumexp(z), target_logit = z[y], entropy = lse - sum_v softmax(z)_v z_v."""
    if backend == "triton":
        from dypo_kernels.vocab_pass import triton_pass

        return triton_pass.row_stats(logits, targets)
    if backend == "cpp":
        return tuple(cpu_extension().vocab_forward(logits, targets))
    return torch_pass.row_stats(logits, targets)


def logit_gradient(logits, targets, lse, entropy, coef_logp, coef_entropy, out, backend):
    """Fills ``out`` [R, V] (fp32, bf16 or fp16; may be ``logits`` itself) with
    coef_logp (onehot(y) - p) - coef_entropy p (z - E_p[z]), p = softmax(z), formed in fp32 and rounded once;
    ``coef_entropy`` may be None. This is the gradient of sum_r coef_logp_r lp_r + coef_entropy_r H_r with respect
    to z. Returns ``out``."""
    if backend == "triton":
        from dypo_kernels.vocab_pass import triton_pass

        return triton_pass.logit_gradient(logits, targets, lse, entropy, coef_logp, coef_entropy, out)
    if backend == "cpp":
        if out is not logits:
            raise ValueError("the C++ vocabulary pass writes its gradient over the logits: out must be logits")
        cpu_extension().vocab_gradient_(logits, targets, lse, entropy, coef_logp, coef_entropy)
        return logits
    return torch_pass.logit_gradient(logits, targets, lse, entropy, coef_logp, coef_entropy, out)
