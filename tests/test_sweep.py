import pytest

from dypo_kernels.sweep import whole_group_chunks


@pytest.mark.parametrize("tokens_per_group,capacity,free_tokens,expected", [
    ([3, 4, 2, 5, 6], 7, 0, [(0, 7, 0, 2), (7, 14, 2, 4), (14, 20, 4, 5)]),
    ([3, 0, 4, 0], 7, 0, [(0, 7, 0, 4)]),
    ([0, 0], 7, 0, []),
    ([3, 8], 7, 0, None),
    ([3, 2], 7, 10, [(0, 7, 0, 2), (7, 14, 2, 2), (14, 15, 2, 2)]),
    ([], 7, 3, [(0, 3, 0, 0)]),
    ([3, 4, 2], float("inf"), 5, [(0, 14, 0, 3)]),
    ([0, 0], 0, 3, None),
])
def test_chunks_hold_whole_groups_then_free_tokens(tokens_per_group, capacity, free_tokens, expected):
    assert whole_group_chunks(tokens_per_group, capacity, free_tokens) == expected


def test_no_gradient_work_under_no_grad(backend, request, monkeypatch):
    """Under torch.no_grad the sweep losses give the same values and form no gradient at all (no logit-gradient
    pass on CPU, no gradient kernel on Triton)."""
    import torch

    from dypo_kernels import Route, dypo_loss, fused_gal_loss, fused_grpo_loss
    from dypo_kernels.linear_logprobs import cpu, triton_kernels
    from tests.batches import sequence_batch

    gradient_passes = []
    add_chunk_gradients, triton_backward = cpu._add_chunk_gradients, triton_kernels.backward
    monkeypatch.setattr(cpu, "_add_chunk_gradients", lambda *a: gradient_passes.append(1) or add_chunk_gradients(*a))
    monkeypatch.setattr(triton_kernels, "backward", lambda *a, **k: gradient_passes.append(1) or
                        triton_backward(*a, **k))
    batch = sequence_batch(4, 6, 16, 50, device=backend)
    args = (batch["hidden"], batch["weight"], batch["targets"])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0]).to(backend)
    losses = {
        "grpo": lambda: fused_grpo_loss(*args, torch.randn(4, generator=torch.Generator().manual_seed(0)).to(backend),
                                        mask=batch["mask"]),
        "gal": lambda: fused_gal_loss(*args, rewards, group_size=2, mask=batch["mask"]),
        "dypo": lambda: dypo_loss(*args, mask=batch["mask"], route=torch.tensor([int(Route.RL)] * 4).to(backend),
                                  rewards=rewards, group_index=torch.tensor([0, 0, 1, 1]).to(backend)),
    }
    for name, loss in losses.items():
        with_grad = loss()
        assert gradient_passes, name
        gradient_passes.clear()
        with torch.no_grad():
            without = loss()
        assert not gradient_passes, name
        assert torch.equal(without, with_grad.detach()), name
