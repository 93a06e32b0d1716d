"""Padding-free inputs (dypo_kernels/packing.py): every op on packed rows with cu_seqlens gives the loss and the
gradients it gives on the same sequences padded, for every loss type, GAL's ragged groups, dypo_loss's three
routes and the KL; a zero-length sequence included; bad offsets are errors naming cu_seqlens."""

import pytest
import torch

from dypo_kernels import (
    batch_totals,
    dypo_loss,
    fused_gal_loss,
    fused_grpo_loss,
    fused_linear_logprobs,
    fused_multi_teacher_kl,
    fused_sft_loss,
    fused_sparse_teacher_kl,
)
from tests.batches import GROUP_INDEX, REWARDS, ROUTE, nearby_logps, sequence_batch


def padded_and_packed(device):
    """The batch of 10 sequences padded to the longest one, and the same sequences packed (sequence 2 has no
    token: a zero-length sequence when packed)."""
    batch = sequence_batch(10, 8, 24, 61, device=device, seed=3)
    mask = batch["mask"]
    lengths = [int(row.nonzero().max()) + 1 if row.any() else 0 for row in mask.cpu()]
    width = max(lengths)
    rows = torch.cat([torch.arange(length) + i * 8 for i, length in enumerate(lengths)]).to(device)
    generator = batch["generator"]
    per_token = dict(targets=batch["targets"], mask=mask,
                     old_logps=nearby_logps(torch.zeros(10, 8), generator, 0.3).to(device) - 2.0,
                     ref_logps=nearby_logps(torch.zeros(10, 8), generator, 0.2).to(device) - 2.0,
                     vllm_is_ratio=(torch.rand(10, 8, generator=generator) + 0.5).to(device))
    padded = {name: value[:, :width] for name, value in per_token.items()}
    packed = {name: value.reshape(-1)[rows] for name, value in per_token.items()}
    hidden = batch["hidden"].detach()
    heads = dict(weight=batch["weight"], bias=batch["bias"])
    padded["hidden"] = hidden[:, :width].clone().requires_grad_()
    packed["hidden"] = hidden.reshape(-1, hidden.shape[-1])[rows].clone().requires_grad_()
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    return padded, packed, heads, cu_seqlens, rows, width


def per_sequence(device):
    return dict(route=torch.tensor(ROUTE, device=device), rewards=torch.tensor(REWARDS, device=device),
                group_index=torch.tensor(GROUP_INDEX, device=device),
                advantages=torch.randn(10, generator=torch.Generator().manual_seed(4)).to(device))


def assert_same(padded_loss, packed_loss, padded, packed, heads, rows, width):
    """The same loss, the same head gradients, and packed hidden gradients equal to the padded ones at those rows."""
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-6, atol=1e-7)
    params = [heads["weight"], heads["bias"]]
    padded_grads = torch.autograd.grad(padded_loss, [padded["hidden"], *params])
    packed_grads = torch.autograd.grad(packed_loss, [packed["hidden"], *params])
    length = padded["hidden"].shape[1]
    gathered = padded_grads[0].reshape(-1, padded_grads[0].shape[-1])[
        torch.div(rows, 8, rounding_mode="floor") * length + rows % 8]
    torch.testing.assert_close(packed_grads[0], gathered, rtol=1e-5, atol=1e-7)
    for name, packed_grad, padded_grad in zip(("weight", "bias"), packed_grads[1:], padded_grads[1:]):
        torch.testing.assert_close(packed_grad, padded_grad, rtol=1e-5, atol=1e-7, msg=name)


GRPO = {"grpo": dict(loss_type="grpo"), "bnpo": dict(loss_type="bnpo"), "dapo": dict(loss_type="dapo"),
        "dr_grpo": dict(loss_type="dr_grpo"), "cispo": dict(loss_type="cispo", eps_high=1.1),
        "sapo": dict(loss_type="sapo"), "luspo": dict(loss_type="luspo"), "vespo": dict(loss_type="vespo"),
        "gspo": dict(loss_type="grpo", importance_sampling_level="sequence"),
        "entropy": dict(loss_type="dapo", entropy_coef=0.3)}


@pytest.mark.parametrize("settings", GRPO.values(), ids=GRPO.keys())
def test_grpo_packed_equals_padded(backend, settings):
    padded, packed, heads, cu_seqlens, rows, width = padded_and_packed(backend)
    advantages = per_sequence(backend)["advantages"]

    def call(batch, **extra):
        return fused_grpo_loss(batch["hidden"], heads["weight"], batch["targets"], advantages, mask=batch["mask"],
                               old_logps=batch["old_logps"], ref_logps=batch["ref_logps"], beta=0.04,
                               vllm_is_ratio=batch["vllm_is_ratio"], bias=heads["bias"], temperature=0.8,
                               use_bias_correction_kl=True, **settings, **extra)

    assert_same(call(padded), call(packed, cu_seqlens=cu_seqlens), padded, packed, heads, rows, width)


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean"])
def test_sft_packed_equals_padded(backend, reduction):
    padded, packed, heads, cu_seqlens, rows, width = padded_and_packed(backend)

    def call(batch, **extra):
        return fused_sft_loss(batch["hidden"], heads["weight"], batch["targets"], mask=batch["mask"],
                              bias=heads["bias"], reduction=reduction, **extra)

    assert_same(call(padded), call(packed, cu_seqlens=cu_seqlens), padded, packed, heads, rows, width)


def test_gal_with_ragged_groups_packed_equals_padded(backend):
    padded, packed, heads, cu_seqlens, rows, width = padded_and_packed(backend)
    sequences = per_sequence(backend)

    def call(batch, **extra):
        return fused_gal_loss(batch["hidden"], heads["weight"], batch["targets"], sequences["rewards"],
                              group_index=sequences["group_index"], mask=batch["mask"], ref_logps=batch["ref_logps"],
                              bias=heads["bias"], beta=0.5, **extra)

    assert_same(call(padded), call(packed, cu_seqlens=cu_seqlens), padded, packed, heads, rows, width)


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "token"), ("dr_grpo", "token"),
                                             ("grpo", "sequence")])
def test_dypo_loss_with_three_routes_packed_equals_padded(backend, loss_type, level):
    padded, packed, heads, cu_seqlens, rows, width = padded_and_packed(backend)
    sequences = per_sequence(backend)

    def call(batch, **extra):
        return dypo_loss(batch["hidden"], heads["weight"], batch["targets"], mask=batch["mask"],
                         route=sequences["route"], rewards=sequences["rewards"],
                         group_index=sequences["group_index"], old_logps=batch["old_logps"],
                         ref_logps=batch["ref_logps"], vllm_is_ratio=batch["vllm_is_ratio"], bias=heads["bias"],
                         alpha=0.3, beta_kl=0.05, entropy_coef=0.1, loss_type=loss_type,
                         importance_sampling_level=level, **extra)

    assert_same(call(padded), call(packed, cu_seqlens=cu_seqlens), padded, packed, heads, rows, width)
    whole = dict(route=sequences["route"], rewards=sequences["rewards"], group_index=sequences["group_index"])
    assert batch_totals(mask=packed["mask"], cu_seqlens=cu_seqlens, **whole) == \
        batch_totals(mask=padded["mask"], **whole)


def test_per_token_ops_take_packed_rows(backend):
    """Log-probs and the KL are per token: cu_seqlens is checked, and the result is the flat rows' one."""
    padded, packed, heads, cu_seqlens, rows, width = padded_and_packed(backend)
    hidden, targets, mask = packed["hidden"], packed["targets"].clamp(min=0), packed["mask"]
    logps = fused_linear_logprobs(hidden, heads["weight"], targets, bias=heads["bias"], cu_seqlens=cu_seqlens)
    torch.testing.assert_close(logps, fused_linear_logprobs(hidden, heads["weight"], targets, bias=heads["bias"]))
    teacher = [torch.randn(hidden.shape, generator=torch.Generator().manual_seed(5)).to(backend)]
    kl = fused_multi_teacher_kl(hidden, heads["weight"], teacher, [heads["weight"].detach()], mask=mask,
                                cu_seqlens=cu_seqlens)
    torch.testing.assert_close(kl, fused_multi_teacher_kl(hidden, heads["weight"], teacher,
                                                          [heads["weight"].detach()], mask=mask))
    top = torch.log_softmax(torch.randn(hidden.shape[0], 61), -1).topk(4, -1)
    sparse = fused_sparse_teacher_kl(hidden, heads["weight"], [top.indices.to(backend)], [top.values.to(backend)],
                                     mask=mask, cu_seqlens=cu_seqlens)
    assert torch.isfinite(sparse)


@pytest.mark.parametrize("offsets,match", [
    ([1, 3, 5], "must start at 0"), ([0, 4, 3, 5], "not decrease"), ([0, 2, 4], "end at the number of token rows"),
    ([], "S \\+ 1 >= 1"),
])
def test_bad_offsets_are_errors_naming_cu_seqlens(offsets, match):
    hidden, weight, targets = torch.randn(5, 8), torch.randn(10, 8), torch.randint(0, 10, (5,))
    cu_seqlens = torch.tensor(offsets, dtype=torch.long)
    for call in (lambda: fused_grpo_loss(hidden, weight, targets, torch.zeros(max(len(offsets) - 1, 0)),
                                         cu_seqlens=cu_seqlens),
                 lambda: fused_sft_loss(hidden, weight, targets, cu_seqlens=cu_seqlens),
                 lambda: fused_linear_logprobs(hidden, weight, targets, cu_seqlens=cu_seqlens)):
        with pytest.raises(ValueError, match=f"cu_seqlens.*{match}|{match}"):
            call()


def test_packed_shapes_are_checked():
    hidden, weight = torch.randn(5, 8), torch.randn(10, 8)
    cu_seqlens = torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match="targets .* one value per packed row"):
        fused_grpo_loss(hidden, weight, torch.zeros(4, dtype=torch.long), torch.zeros(2), cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="hidden must be \\[N, D\\] packed rows"):
        fused_grpo_loss(hidden[None], weight, torch.zeros(1, 5, dtype=torch.long), torch.zeros(2),
                        cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="advantages"):
        fused_grpo_loss(hidden, weight, torch.zeros(5, dtype=torch.long), torch.zeros(3), cu_seqlens=cu_seqlens)
