"""The benchmark cases: for one loss and one implementation, the inputs on a device and the forward closure whose
result's backward is timed. Shared by the pytest-benchmark suite, the CPU subprocess probe (cpu_case.py) and the GPU
report (report.py), so that all three measure the same work.

Losses (N = B * T tokens, sequences of T tokens; the weights are the lm_head [V, D]):
    logprobs  a per-token log-prob loss (sum of random multiples of each token's log-prob)
    sft       mean negative log-likelihood of all tokens
    grpo      DAPO aggregation, eps 0.2, beta 0.04 with reference log-probs, old log-probs = the current policy's
    gal       groups of two (rollout b succeeds, rollout b + B/2 fails: Liger-Kernel's DPO layout), no reference,
              beta 0.1 (DPO's usual value: with beta 1, sequence sums differing by tens saturate the sigmoid and naive
              PyTorch's and Liger's CPU backward run on subnormal floats, 30x slower)
    dypo      half the rows RL rollouts of mid prompts (two each), half SFT trajectories of hard prompts (one each);
              old = current log-probs
    kl        forward KL to the mixture of m teachers of hidden size D (student and teachers share the shape)
    scoring   token log-probs and entropies under torch.no_grad (forward only: no backward is timed)
    advantages  group_advantages of B = N rewards in groups of 8

Implementations: "fused" (dypo_kernels; ``dypo_impl`` = "chunked" or "fused" is passed to the op as ``impl``, None
leaves the library's default; the multi-teacher KL is chunked only; on CPU the backend is chosen by
DYPO_KERNELS_BACKEND or the device), "naive"
(reference.py in the inputs' dtype: materialised logits), "liger" / "liger-compiled" (Liger-Kernel's chunked loss
for grpo, gal (DPO), kl with m = 1 (JSD, beta 0), and its fused linear cross-entropy for sft and logprobs on CUDA),
"cce" (Cut Cross-Entropy for sft and logprobs).

Inputs: hidden ~ N(0, 1); weights ~ N(0, 1/D), logits of standard deviation about 1 (a flat softmax), or with
``peaked`` ~ N(0, 1), logits of standard deviation sqrt(D) (32 at D = 1,024: the peaked softmax of a trained model
sampled at low temperature). matmul_flop counts what each implementation does: dypo_kernels' from
benchmarks/floor.py (the chunked impl's where ``dypo_impl`` is None: the only one on CPU and the CUDA default).
"""

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from benchmarks import floor

LOSSES = ("logprobs", "sft", "grpo", "gal", "dypo", "kl", "scoring", "advantages")
IMPLEMENTATIONS = ("fused", "naive", "liger", "liger-compiled", "cce")


class Unavailable(Exception):
    """This implementation does not offer this loss here (missing package, needs CUDA, ...): the reason says why."""


class NotInstalled(Unavailable):
    """The competitor's package is missing or fails to import: a report says so rather than dropping its rows."""


@dataclass
class Case:
    forward: Callable[[], torch.Tensor]
    params: List[torch.Tensor]
    matmul_flop: float  # FLOP of the matrix products this implementation does for one forward + backward
    notes: str = ""
    inputs: dict = field(default_factory=dict)  # hidden, weight, targets (and teachers for kl)
    loss_of_logps: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # the loss from token log-probs [B, T]

    def step(self):
        """One forward + backward; gradients cleared after."""
        loss = self.forward()
        if self.params:
            loss.backward()
            for param in self.params:
                param.grad = None
        return loss


def _liger():
    try:
        import liger_kernel.chunked_loss as chunked
    except Exception as exc:  # not installed, or fails to import on this stack
        raise NotInstalled(f"liger-kernel unavailable ({type(exc).__name__}: {exc})")
    return chunked


def build(loss, impl, N, D, V, *, T=512, teachers=1, dtype=torch.float32, device="cpu", seed=0, dypo_impl=None,
          peaked=False) -> Case:
    """The case ``loss`` x ``impl`` (``dypo_impl``: the dypo_kernels impl, for impl "fused"); raises Unavailable
    when the implementation does not run here. The inputs are drawn on the device: the same seed gives the same
    inputs to every implementation."""
    import dypo_kernels
    from dypo_kernels import reference
    from dypo_kernels.backend import select_backend

    if loss not in LOSSES or impl not in IMPLEMENTATIONS or dypo_impl not in (None,) + floor.IMPLS:
        raise ValueError(f"unknown case {loss!r} x {impl!r} (dypo_impl {dypo_impl!r})")
    device = torch.device(device)
    if impl == "fused" and dypo_impl == "fused":
        if loss == "kl":
            raise Unavailable("dypo_kernels' multi-teacher KL has no fused impl (chunked only)")
        if select_backend(device) != "triton":
            raise Unavailable("dypo_kernels' fused impl runs the Triton kernels: it needs CUDA tensors (or "
                              "DYPO_KERNELS_BACKEND=triton with TRITON_INTERPRET=1)")
    generator = torch.Generator(device=device).manual_seed(seed)

    def make(*shape, scale=1.0, grad=False):
        tensor = torch.randn(*shape, generator=generator, device=device).mul_(scale).to(dtype)
        return tensor.requires_grad_() if grad else tensor

    T = min(T, N)
    batch = N // T
    naive = dict(dtype=dtype)
    options = {} if dypo_impl is None else dict(impl=dypo_impl)  # the dypo_kernels ops' keywords

    def dypo_flop(op):
        return floor.matmul_flop(op, dypo_impl or "chunked", N, D, V, teachers=teachers)

    if loss == "advantages":
        rewards = (torch.rand(N, generator=generator, device=device) > 0.5).float()
        if impl == "fused":
            return Case(lambda: dypo_kernels.group_advantages(rewards, group_size=8).advantages, [], 0.0)
        if impl == "naive":
            return Case(lambda: reference.group_advantages(rewards, group_size=8, dtype=torch.float32).advantages,
                        [], 0.0)
        raise Unavailable(f"{impl} has no group-advantages op")
    hidden = make(batch, T, D, grad=True)
    weight_scale = 1.0 if peaked else D**-0.5
    weight = make(V, D, scale=weight_scale, grad=True)
    targets = torch.randint(0, V, (batch, T), generator=generator, device=device)
    params = [hidden, weight]
    inputs = dict(hidden=hidden, weight=weight, targets=targets)
    projection = 2.0 * N * D * V

    if loss == "scoring":
        if impl == "fused":
            def score():
                with torch.no_grad():
                    return dypo_kernels.fused_linear_logprobs(hidden, weight, targets, return_entropy=True, **options)
            return Case(score, [], dypo_flop("scoring"))
        if impl == "naive":
            def score():
                with torch.no_grad():
                    return reference.token_logprobs(hidden, weight, targets, **naive)
            return Case(score, [], projection)
        raise Unavailable(f"{impl} has no scoring op (log-probs and entropies)")

    if loss == "kl":
        teacher_hiddens = [make(batch, T, D) for _ in range(teachers)]
        teacher_weights = [make(V, D, scale=weight_scale) for _ in range(teachers)]
        teacher_flop = teachers * projection
        inputs.update(teacher_hiddens=teacher_hiddens, teacher_weights=teacher_weights)
        if impl == "fused":
            return Case(lambda: dypo_kernels.fused_multi_teacher_kl(hidden, weight, teacher_hiddens, teacher_weights,
                                                                    **options),
                        params, dypo_flop("kl"), inputs=inputs)
        if impl == "naive":
            return Case(lambda: reference.multi_teacher_kl(hidden, weight, teacher_hiddens, teacher_weights, **naive),
                        params, teacher_flop + 3 * projection, inputs=inputs)
        if impl.startswith("liger") and teachers == 1:
            jsd = _liger().LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                                   compiled=impl == "liger-compiled")
            labels = targets.reshape(-1)
            return Case(lambda: jsd(hidden.reshape(N, D), weight, teacher_hiddens[0].reshape(N, D),
                                    teacher_weights[0], labels), params, teacher_flop + 3 * projection,
                        inputs=inputs)
        raise Unavailable(f"{impl} has no multi-teacher KL" + (" for m > 1" if impl.startswith("liger") else ""))

    if loss in ("logprobs", "sft"):
        grad_logps = torch.randn(batch, T, generator=generator, device=device)
        if loss == "sft":
            def of_logps(token_logps):
                return -token_logps.mean()
        else:
            def of_logps(token_logps):
                return (token_logps * grad_logps.to(token_logps.dtype)).sum()
        if impl == "fused":
            if loss == "sft":
                return Case(lambda: dypo_kernels.fused_sft_loss(hidden, weight, targets, **options), params,
                            dypo_flop("sft"), inputs=inputs, loss_of_logps=of_logps)
            return Case(lambda: (dypo_kernels.fused_linear_logprobs(hidden, weight, targets, **options)
                                 * grad_logps).sum(), params, dypo_flop("logprobs"), inputs=inputs,
                        loss_of_logps=of_logps)
        if impl == "naive":
            if loss == "sft":
                return Case(lambda: torch.nn.functional.cross_entropy(
                    (hidden @ weight.T).float().reshape(N, V), targets.reshape(-1)), params, 3 * projection)
            return Case(lambda: of_logps(reference.token_logprobs(hidden, weight, targets, **naive)[0]),
                        params, 3 * projection)
        if impl.startswith("liger"):
            if device.type != "cuda":
                raise Unavailable("Liger-Kernel's fused linear cross-entropy is a Triton kernel: it needs CUDA")
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            reduction = "mean" if loss == "sft" else "none"
            cross_entropy = LigerFusedLinearCrossEntropyLoss(reduction=reduction)
            if loss == "sft":
                return Case(lambda: cross_entropy(weight, hidden.reshape(N, D), targets.reshape(-1)), params,
                            3 * projection)
            return Case(lambda: -(cross_entropy(weight, hidden.reshape(N, D), targets.reshape(-1))
                                  * grad_logps.reshape(-1)).sum(), params, 3 * projection)
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as exc:
            raise NotInstalled(f"cut-cross-entropy unavailable ({type(exc).__name__}: {exc})")
        cce_impl = "cce" if device.type == "cuda" else "torch_compile"
        reduction = "mean" if loss == "sft" else "none"
        if loss == "sft":
            return Case(lambda: linear_cross_entropy(hidden, weight, targets, impl=cce_impl, reduction=reduction),
                        params, 4 * projection, notes=cce_impl)
        return Case(lambda: -(linear_cross_entropy(hidden, weight, targets, impl=cce_impl, reduction=reduction)
                              * grad_logps).sum(), params, 4 * projection, notes=cce_impl)

    mask = torch.ones(batch, T, dtype=torch.bool, device=device)
    with torch.no_grad():  # the first update after the rollouts: old log-probs are the current policy's
        old_logps = dypo_kernels.fused_linear_logprobs(hidden, weight, targets)
    ref_logps = old_logps + 0.01 * torch.randn(batch, T, generator=generator, device=device)

    if loss == "grpo":
        rewards = (torch.arange(batch, device=device) % 2).float()
        advantages = dypo_kernels.group_advantages(rewards, group_size=batch).advantages
        settings = dict(old_logps=old_logps, ref_logps=ref_logps, beta=0.04, loss_type="dapo")

        def of_logps(token_logps):
            return reference.grpo_loss_from_logps(token_logps, advantages, **settings)

        if impl == "fused":
            return Case(lambda: dypo_kernels.fused_grpo_loss(hidden, weight, targets, advantages, **settings,
                                                             **options),
                        params, dypo_flop("grpo"), inputs=inputs, loss_of_logps=of_logps)
        if impl == "naive":
            return Case(lambda: of_logps(reference.token_logprobs(hidden, weight, targets, **naive)[0]), params,
                        3 * projection)
        if impl.startswith("liger"):
            grpo = _liger().LigerFusedLinearGRPOLoss(beta=0.04, compiled=impl == "liger-compiled", loss_type="dapo")
            return Case(lambda: grpo(hidden, weight, targets, mask.long(), advantages, ref_per_token_logps=ref_logps,
                                     old_per_token_logps=old_logps)[0], params, 4 * projection)
        raise Unavailable("Cut Cross-Entropy has no GRPO loss")

    if loss == "gal":
        if batch % 2:
            raise Unavailable("the GAL case needs an even number of sequences")
        half = batch // 2
        rewards = torch.cat([torch.ones(half, device=device), torch.zeros(half, device=device)])
        pairs = torch.arange(batch, device=device) % half

        def of_logps(token_logps):
            return reference.gal_loss(token_logps.sum(-1), rewards, group_index=pairs, beta=0.1,
                                      dtype=token_logps.dtype)

        if impl == "fused":
            # one sweep in either impl: a chunked impl's chunk grows to hold a whole pair
            return Case(lambda: dypo_kernels.fused_gal_loss(hidden, weight, targets, rewards, group_index=pairs,
                                                            beta=0.1, **options),
                        params, dypo_flop("gal"), inputs=inputs, loss_of_logps=of_logps)
        if impl == "naive":
            return Case(lambda: of_logps(reference.token_logprobs(hidden, weight, targets, **naive)[0]), params,
                        3 * projection)
        if impl.startswith("liger"):
            dpo = _liger().LigerFusedLinearDPOLoss(beta=0.1, compiled=impl == "liger-compiled", use_ref_model=False)
            return Case(lambda: dpo(weight, hidden, targets)[0], params, 3 * projection)  # grad_and_value per chunk
        raise Unavailable("Cut Cross-Entropy has no preference loss")

    # dypo: mid prompts of two rollouts each (RL rows), then hard prompts of one teacher trajectory each (SFT rows)
    rl = batch - batch // 2
    route = torch.tensor([1] * rl + [2] * (batch // 2), device=device)
    rewards = (torch.arange(batch, device=device) % 2).float()
    rows = torch.arange(batch, device=device)
    group_index = torch.where(rows < rl, rows // 2, (rl + 1) // 2 + rows - rl)
    settings = dict(mask=mask, route=route, rewards=rewards, group_index=group_index, old_logps=old_logps,
                    ref_logps=ref_logps)

    def of_logps(token_logps):
        return reference.dypo_loss_from_logps(token_logps, **settings)

    if impl == "fused":
        return Case(lambda: dypo_kernels.dypo_loss(hidden, weight, targets, **settings, **options), params,
                    dypo_flop("dypo"), inputs=inputs, loss_of_logps=of_logps)
    if impl == "naive":
        return Case(lambda: of_logps(reference.token_logprobs(hidden, weight, targets, **naive)[0]), params,
                    3 * projection)
    raise Unavailable(f"{impl} has no DYPO loss")
