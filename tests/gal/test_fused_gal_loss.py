import pytest
import torch

from dypo_kernels import fused_gal_loss, reference, sweep
from dypo_kernels.gal.terms import GROUP_GROWTH
from tests.batches import gradients, nearby_logps, sequence_batch
from tests.conftest import relative_error, set_chunk_rows


def reference_fused_gal(batch, rewards, *, ref_logps=None, average_log_prob=False, temperature=1.0, **group):
    logps, _ = reference.token_logprobs(batch["hidden"], batch["weight"], batch["targets"], bias=batch["bias"],
                                        temperature=temperature)
    mask = batch["mask"]
    seq_logps = reference.sequence_logprobs(logps, mask, average=average_log_prob)
    ref_seq = None if ref_logps is None else reference.sequence_logprobs(ref_logps.double(), mask,
                                                                         average=average_log_prob)
    return reference.gal_loss(seq_logps, rewards, ref_seq_logps=ref_seq, **group)


CHUNK_ROWS = {"groups share a chunk": 45, "a chunk per group": 28, "a chunk grows to hold a group": 7,
              "large groups swept ahead": 2}


@pytest.fixture(params=list(CHUNK_ROWS))
def chunk_rows(request, backend, monkeypatch):
    """Chunks of CHUNK_ROWS rows at V = 90: the tests' batches have groups of at most 4 x 7 tokens (28 rows hold one
    group, not two; 7 rows make the chunk grow to hold each group whole; with 2 rows, groups of more than 8
    tokens are swept ahead)."""
    set_chunk_rows(monkeypatch, CHUNK_ROWS[request.param], 90, request.node.backend_name)
    return CHUNK_ROWS[request.param]


@pytest.mark.parametrize("average_log_prob", [False, True])
@pytest.mark.parametrize("groups", ["uniform", "ragged"])
def test_matches_float64_reference(backend, chunk_rows, average_log_prob, groups):
    batch = sequence_batch(8, 7, 32, 90, device=backend)
    generator = batch["generator"]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.2]).to(backend)
    group = (dict(group_size=4) if groups == "uniform"
             else dict(group_index=torch.tensor([2, 0, 1, 0, 2, 1, 1, 0]).to(backend)))
    ref_logps = nearby_logps(torch.full(batch["targets"].shape, -4.0), generator, 0.5).to(backend)
    kwargs = dict(mask=batch["mask"], ref_logps=ref_logps, beta=0.7, average_log_prob=average_log_prob,
                  bias=batch["bias"], temperature=0.8)
    loss, metrics = fused_gal_loss(batch["hidden"], batch["weight"], batch["targets"], rewards, return_metrics=True,
                                   **group, **kwargs)
    expected = reference_fused_gal(batch, rewards, ref_logps=ref_logps, beta=0.7, average_log_prob=average_log_prob,
                                   temperature=0.8, **group)
    assert relative_error(loss, expected) < 1e-5
    for grad, ref in zip(gradients(loss, batch), gradients(expected, batch)):
        assert relative_error(grad, ref) < 1e-5
    assert metrics["num_pairs"].item() > 0


def test_groups_without_pairs_are_not_projected(request, backend, chunk_rows, monkeypatch):
    batch = sequence_batch(8, 7, 32, 90, device=backend)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0]).to(backend)  # group 1 of 4: all equal
    projected = []
    chunk_logits = sweep.chunk_logits
    monkeypatch.setattr(sweep, "chunk_logits", lambda hidden, *args: projected.append(hidden.shape[0]) or
                        chunk_logits(hidden, *args))
    loss = fused_gal_loss(batch["hidden"], batch["weight"], batch["targets"], rewards, group_size=4,
                          mask=batch["mask"], bias=batch["bias"])
    grad_hidden = gradients(loss, batch)[0]
    expected = reference_fused_gal(batch, rewards, group_size=4)
    assert relative_error(loss, expected) < 1e-5
    assert torch.all(grad_hidden[4:] == 0)
    if request.node.impl_name == "chunked":  # the rows of the group with pairs only; twice if it is swept ahead
        tokens = int(batch["mask"][:4].sum())
        assert sum(projected) == tokens * (2 if tokens > GROUP_GROWTH * chunk_rows else 1)


def test_ref_seq_logps_equals_ref_logps_summed(backend):
    batch = sequence_batch(4, 6, 16, 50, device=backend)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0]).to(backend)
    ref_logps = torch.randn(batch["targets"].shape, generator=batch["generator"]).to(backend)
    common = (batch["hidden"], batch["weight"], batch["targets"], rewards)
    by_token = fused_gal_loss(*common, group_size=2, mask=batch["mask"], ref_logps=ref_logps)
    by_sequence = fused_gal_loss(*common, group_size=2, mask=batch["mask"],
                                 ref_seq_logps=(ref_logps * batch["mask"]).sum(-1))
    assert torch.allclose(by_token, by_sequence, rtol=1e-6, atol=1e-6)


def test_no_pair_gives_zero_loss_with_zero_gradients(backend):
    batch = sequence_batch(4, 5, 16, 40, device=backend)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0]).to(backend)  # groups of two with equal rewards: no pair
    loss = fused_gal_loss(batch["hidden"], batch["weight"], batch["targets"], rewards, group_size=2,
                          mask=batch["mask"], bias=batch["bias"])
    assert loss.item() == 0.0
    assert all(torch.all(g == 0) and torch.isfinite(g).all() for g in gradients(loss, batch))


@pytest.mark.parametrize("kwargs,match", [
    (dict(group_size=3), "group_size"),
    (dict(group_index=torch.tensor([0, 2, 2, 0])), "group_index"),
    (dict(group_size=2, rewards=torch.tensor([1.0, float("nan"), 0.0, 1.0])), "rewards"),
    (dict(group_size=2, rewards=torch.ones(3)), "rewards"),
    (dict(group_size=2, ref_logps=torch.zeros(4, 5), ref_seq_logps=torch.zeros(4)), "ref_logps.*ref_seq_logps"),
    (dict(group_size=2, ref_logps=torch.zeros(4, 3)), "ref_logps"),
    (dict(group_size=2, beta=-1.0), "beta"),
    (dict(group_size=2, mask=torch.ones(4)), "mask"),
])
def test_bad_input_raises_naming_the_argument(kwargs, match):
    rewards = kwargs.pop("rewards", torch.tensor([1.0, 0.0, 0.0, 1.0]))
    with pytest.raises((ValueError, TypeError), match=match):
        fused_gal_loss(torch.randn(4, 5, 8), torch.randn(10, 8), torch.randint(0, 10, (4, 5)), rewards, **kwargs)
