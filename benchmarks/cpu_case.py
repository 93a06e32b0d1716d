"""One forward + backward of a loss, in a fresh process, on the CPU: prints its peak extra memory (peak RSS above the
inputs, DESIGN.md section 5) and its median time as JSON.

    python -m benchmarks.cpu_case '{"impl": "fused", "backend": "cpp", "N": 4096, "D": 1024, "V": 32768}'
    python -m benchmarks.cpu_case '{"impl": "liger", "loss": "grpo", "N": 4096, "D": 1024, "V": 32768}'

loss: "logprobs" (a per-token log-prob loss; default), "grpo", "gal", "sft" or "dypo" on sequences of T tokens
(N = B * T, one group of B rollouts; for "dypo" half the rows are RL rollouts of one prompt and half SFT
trajectories of another), or "kl" (forward KL to the mixture of ``teachers`` teachers of hidden size D). impl: "fused" (dypo_kernels with backend "cpp" or "torch"), "naive" (materialised fp32
logits: the reference.py function in the inputs' dtype) or "liger" (LigerFusedLinearGRPOLoss, uncompiled, for
"grpo"). The memory is read on the first call, before any warm-up can leave freed blocks in the allocator; the
time is the median of ``repeats`` later calls.
"""

import json
import os
import statistics
import sys
import time


def _rss_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _teachers(count, N, D, V, seed=2):
    """The frozen inputs of ``count`` teachers of hidden size D."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return ([torch.randn(N, D, generator=generator) for _ in range(count)],
            [torch.randn(V, D, generator=generator) / D**0.5 for _ in range(count)])


def _steps(impl, loss, hidden, weight, targets, rewards, old_logps, ref_logps, T, teachers):
    """The forward of ``loss`` by ``impl`` on [N, D] hidden states, as a function returning a scalar."""
    import torch
    import torch.nn.functional as F

    import dypo_kernels
    from dypo_kernels import reference

    N, D = hidden.shape
    batch = N // T
    seq_hidden, seq_targets = hidden.view(batch, T, D), targets.view(batch, T)
    mask = torch.ones(batch, T, dtype=torch.bool)
    advantages = dypo_kernels.group_advantages(rewards, group_size=batch).advantages
    grpo = dict(old_logps=old_logps, ref_logps=ref_logps, beta=0.04, loss_type="dapo")
    route = torch.tensor([1] * (batch - batch // 2) + [2] * (batch // 2))
    group_index = (route == 2).long()
    dypo = dict(mask=mask, route=route, rewards=rewards, group_index=group_index, old_logps=old_logps,
                ref_logps=ref_logps)
    naive = dict(dtype=hidden.dtype)
    if loss == "logprobs":
        grad_logps = torch.randn(N, generator=torch.Generator().manual_seed(1))
        if impl == "fused":
            return lambda: (dypo_kernels.fused_linear_logprobs(hidden, weight, targets) * grad_logps).sum()
        return lambda: (reference.token_logprobs(hidden, weight, targets, **naive)[0] * grad_logps).sum()
    if loss == "kl":
        teacher_hiddens, teacher_weights = _teachers(teachers, N, D, weight.shape[0])
        function = dypo_kernels.fused_multi_teacher_kl if impl == "fused" else reference.multi_teacher_kl
        extra = {} if impl == "fused" else naive
        return lambda: function(hidden, weight, teacher_hiddens, teacher_weights, **extra)
    if loss == "grpo" and impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=0.04, compiled=False, loss_type="dapo")
        return lambda: liger(seq_hidden, weight, seq_targets, mask.long(), advantages,
                             ref_per_token_logps=ref_logps, old_per_token_logps=old_logps)[0]
    if impl == "fused":
        return {"grpo": lambda: dypo_kernels.fused_grpo_loss(seq_hidden, weight, seq_targets, advantages, **grpo),
                "gal": lambda: dypo_kernels.fused_gal_loss(seq_hidden, weight, seq_targets, rewards, group_size=batch,
                                                           ref_logps=ref_logps),
                "sft": lambda: dypo_kernels.fused_sft_loss(seq_hidden, weight, seq_targets),
                "dypo": lambda: dypo_kernels.dypo_loss(seq_hidden, weight, seq_targets, **dypo)}[loss]

    def naive_gal():
        token_logps, _ = reference.token_logprobs(seq_hidden, weight, seq_targets, **naive)
        return reference.gal_loss(token_logps.sum(-1), rewards, ref_seq_logps=ref_logps.sum(-1), group_size=batch,
                                  **naive)

    return {"grpo": lambda: reference.grpo_loss(seq_hidden, weight, seq_targets, advantages, **grpo, **naive),
            "gal": naive_gal,
            "sft": lambda: F.cross_entropy((seq_hidden @ weight.T).view(N, -1), targets),
            "dypo": lambda: reference.dypo_loss(seq_hidden, weight, seq_targets, **dypo, **naive)}[loss]


def run_case(impl, N, D, V, backend="cpp", loss="logprobs", T=512, teachers=3, repeats=0, seed=0):
    if impl == "fused":
        os.environ["DYPO_KERNELS_BACKEND"] = backend
    import torch

    from dypo_kernels import fused_linear_logprobs
    from dypo_kernels.backend import cpu_extension

    if impl == "fused" and backend == "cpp":
        cpu_extension()  # build or load before the baseline
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=generator).requires_grad_()
    weight = (torch.randn(V, D, generator=generator) / D**0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=generator)
    T = min(T, N)
    batch = N // T
    rewards = (torch.arange(batch) % 2).float()
    # the first update after the rollouts: old log-probs are the current policy's (dypo_loss then takes one sweep)
    with torch.no_grad():
        old_logps = fused_linear_logprobs(hidden, weight, targets).view(batch, T) if loss not in ("logprobs", "kl") \
            else None
    ref_logps = None if old_logps is None else old_logps + 0.01 * torch.randn(batch, T, generator=generator)
    forward = _steps(impl, loss, hidden, weight, targets, rewards, old_logps, ref_logps, T, teachers)

    def step():
        forward().backward()
        hidden.grad = weight.grad = None

    with open("/proc/self/clear_refs", "w") as clear:  # reset the peak RSS to the current RSS
        clear.write("5")
    baseline = _rss_kib("VmRSS")
    start = time.perf_counter()
    step()
    first_seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"impl": f"fused-{backend}" if impl == "fused" else impl, "loss": loss, "N": N, "D": D, "V": V,
            "peak_extra_mb": (peak - baseline) / 1024,
            "seconds": statistics.median(times) if times else first_seconds}


def measure(pin_allocator=False, **case):
    """Runs one case in a fresh subprocess and returns its result dict.

    ``pin_allocator``: glibc's malloc serves every allocation over 64 KiB by mmap (MALLOC_MMAP_THRESHOLD_), so that
    the peak RSS follows the live tensors instead of the allocator's adaptive threshold, which otherwise moves the
    peak by tens of MB from run to run. The memory tests use it; it slows every allocation, so timings do not.
    """
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if pin_allocator else None
    result = subprocess.run([sys.executable, "-m", "benchmarks.cpu_case", json.dumps(case)], capture_output=True,
                            text=True, check=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run_case(**json.loads(sys.argv[1]))))
