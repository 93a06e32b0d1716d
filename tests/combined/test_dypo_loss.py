import pytest
import torch

from dypo_kernels import BatchTotals, Route, batch_totals, dypo_loss, fused_grpo_loss, fused_linear_logprobs, reference
from tests.batches import gradients, nearby_logps, sequence_batch
from tests.conftest import HAS_CUDA, relative_error, set_chunk_rows
from tests.linear_logprobs.test_linear_logprobs import low_precision_dtype

# 4 prompts: 0 and 2 mid (RL rollouts), 1 hard (two SFT teacher trajectories), 3 easy (SKIP); rows shuffled
GROUP_INDEX = [0, 1, 0, 2, 3, 2, 1, 0, 2, 3]
ROUTE = [Route.RL, Route.SFT, Route.RL, Route.RL, Route.SKIP, Route.RL, Route.SFT, Route.RL, Route.RL, Route.SKIP]
REWARDS = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.3, 1.0]
OLD_LOGPS = ["none", "current", "stale"]


def dypo_inputs(device, old="none", temperature=0.7, seed=0, dtype=torch.float32):
    batch = sequence_batch(len(ROUTE), 8, 40, 101, dtype=dtype, device=device, seed=seed)
    current = fused_linear_logprobs(batch["hidden"], batch["weight"], batch["targets"], bias=batch["bias"],
                                    temperature=temperature).detach()
    generator = batch["generator"]
    kwargs = dict(mask=batch["mask"], route=torch.tensor(ROUTE).to(device), rewards=torch.tensor(REWARDS).to(device),
                  group_index=torch.tensor(GROUP_INDEX).to(device), ref_logps=nearby_logps(current, generator, 0.2),
                  bias=batch["bias"], temperature=temperature, alpha=0.3, gamma=0.7, beta_gal=0.5, beta_kl=0.05,
                  eps_low=0.2, eps_high=0.28)
    if old == "current":
        kwargs["old_logps"] = current
    elif old == "stale":
        kwargs["old_logps"] = nearby_logps(current, generator, 0.3)
    return batch, kwargs


CHUNK_ROWS = {"groups share a chunk": 40, "a chunk per group": 24, "a chunk grows to hold a group": 7,
              "large groups swept ahead": 2}


@pytest.fixture(params=list(CHUNK_ROWS))
def chunk_rows(request, backend, monkeypatch):
    """Chunks of CHUNK_ROWS rows at V = 101: the RL groups of dypo_inputs hold at most 3 x 8 tokens (24 rows hold one
    group, not two; 7 rows make the chunk grow to hold each group whole; with 2 rows, groups of more than 8
    tokens are swept ahead)."""
    set_chunk_rows(monkeypatch, CHUNK_ROWS[request.param], 101, request.node.backend_name)
    return CHUNK_ROWS[request.param]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("old", OLD_LOGPS)
def test_matches_float64_reference(backend, chunk_rows, loss_type, old):
    batch, kwargs = dypo_inputs(backend, old)
    args = (batch["hidden"], batch["weight"], batch["targets"])
    loss, metrics = dypo_loss(*args, loss_type=loss_type, return_metrics=True, **kwargs)
    expected = reference.dypo_loss(*args, loss_type=loss_type, **kwargs)
    assert relative_error(loss, expected) < 1e-5
    for name, grad, ref in zip(("hidden", "weight", "bias"), gradients(loss, batch), gradients(expected, batch)):
        assert relative_error(grad, ref) < 1e-5, name
    assert (metrics["num_prompts_rl"], metrics["num_prompts_sft"]) == (2, 1)


RL_VARIANTS = {"cispo": dict(loss_type="cispo", eps_high=1.1), "sapo": dict(loss_type="sapo"),
               "luspo": dict(loss_type="luspo"), "delta": dict(loss_type="dapo", delta=1.05),
               "vllm_is_ratio": dict(loss_type="grpo", vllm_is_ratio="tokens"),
               "entropy_grpo": dict(loss_type="grpo", entropy_coef=0.3),
               "entropy_dr_grpo": dict(loss_type="dr_grpo", entropy_coef=0.3),
               "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", eps_high=0.05),
               "gspo_corrected_kl": dict(loss_type="dapo", importance_sampling_level="sequence",
                                         use_bias_correction_kl=True, beta_kl=1.0, vllm_is_ratio="tokens"),
               "gspo_without_gal": dict(loss_type="luspo", importance_sampling_level="sequence", alpha=1.0)}


@pytest.mark.parametrize("variant", list(RL_VARIANTS))
def test_rl_variants_and_entropy_match_float64_reference(backend, chunk_rows, variant):
    """fused_grpo_loss's variants and the entropy bonus on the RL rows, inside the one sweep with GAL and SFT."""
    batch, kwargs = dypo_inputs(backend, "stale")
    kwargs.update(RL_VARIANTS[variant])
    if kwargs.get("vllm_is_ratio") == "tokens":
        kwargs["vllm_is_ratio"] = (torch.rand(10, 8, generator=torch.Generator().manual_seed(5)) + 0.5).to(backend)
    args = (batch["hidden"], batch["weight"], batch["targets"])
    loss = dypo_loss(*args, **kwargs)
    expected = reference.dypo_loss(*args, **kwargs)
    assert relative_error(loss, expected) < 1e-5
    for name, grad, ref in zip(("hidden", "weight", "bias"), gradients(loss, batch), gradients(expected, batch)):
        assert relative_error(grad, ref) < 1e-5, name


@pytest.mark.parametrize("old", ["none", "stale"])
def test_bias_corrected_kl_matches_float64_reference(backend, old):
    batch, kwargs = dypo_inputs(backend, old)
    kwargs.update(use_bias_correction_kl=True, beta_kl=1.0)  # a KL term large enough for its correction to show
    args = (batch["hidden"], batch["weight"], batch["targets"])
    loss, metrics = dypo_loss(*args, return_metrics=True, **kwargs)
    expected = reference.dypo_loss(*args, **kwargs)
    expected_grads = gradients(expected, batch)
    assert relative_error(loss, expected) < 1e-5
    for name, grad, ref in zip(("hidden", "weight", "bias"), gradients(loss, batch), expected_grads):
        assert relative_error(grad, ref) < 1e-5, name
    uncorrected = reference.dypo_loss(*args, **{**kwargs, "use_bias_correction_kl": False})
    assert relative_error(gradients(uncorrected, batch)[1], expected_grads[1]) > 1e-3  # the correction matters


def test_low_precision_within_torch_own_error(backend, request):
    dtype = low_precision_dtype(request.node.backend_name)
    batch, kwargs = dypo_inputs(backend, "current", dtype=dtype)
    args = (batch["hidden"], batch["weight"], batch["targets"])
    loss, expected = dypo_loss(*args, **kwargs), reference.dypo_loss(*args, **kwargs)
    naive = reference.dypo_loss(*args, dtype=dtype, **kwargs)

    def bound(naive_error):  # naive fp16 overflows in places (it gives NaN): then a fixed fp16-sized bound
        return 2 * naive_error + 1e-5 if naive_error == naive_error else 1e-2

    assert relative_error(loss, expected) <= bound(relative_error(naive, expected))
    for grad, ref, base in zip(gradients(loss, batch), gradients(expected, batch), gradients(naive, batch)):
        assert grad.dtype == dtype
        assert relative_error(grad, ref) <= bound(relative_error(base, ref))


def test_reference_is_the_weighted_sum_of_the_separate_losses():
    """The oracle itself, against gamma SFT + alpha GRPO + (1 - alpha) GAL assembled by hand from the references."""
    batch, kwargs = dypo_inputs("cpu", "stale")
    hidden, weight, targets, mask = batch["hidden"], batch["weight"], batch["targets"].clone(), batch["mask"].clone()
    mask[:, 0] = True  # every sequence has a token: the SFT part is then sft_loss's seq_mean
    targets[:, 0] = 5
    route, rewards = kwargs["route"], kwargs["rewards"]
    rl, sft = route == Route.RL, route == Route.SFT
    rl_group = torch.tensor([0, 0, 1, 1, 0, 1])  # prompts 0 and 2, in row order
    common = dict(bias=kwargs["bias"], temperature=kwargs["temperature"])
    sft_part = reference.sft_loss(hidden[sft], weight, targets[sft], mask=mask[sft], reduction="seq_mean", **common)
    advantages = reference.group_advantages(rewards[rl], group_index=rl_group).advantages
    grpo_part = reference.grpo_loss(hidden[rl], weight, targets[rl], advantages, mask=mask[rl],
                                    old_logps=kwargs["old_logps"][rl], ref_logps=kwargs["ref_logps"][rl], beta=0.05,
                                    eps_low=0.2, eps_high=0.28, **common)
    logps, _ = reference.token_logprobs(hidden[rl], weight, targets[rl], **common)
    ref_seq = (kwargs["ref_logps"][rl] * mask[rl]).sum(-1)
    gal_part = reference.gal_loss((logps * mask[rl]).sum(-1), rewards[rl], ref_seq_logps=ref_seq,
                                  group_index=rl_group, beta=0.5)
    by_hand = (1 * 0.7 * sft_part + 2 * (0.3 * grpo_part + 0.7 * gal_part)) / 3
    kwargs["mask"] = mask
    assert relative_error(reference.dypo_loss(hidden, weight, targets, **kwargs), by_hand) < 1e-9
    loss, metrics = dypo_loss(hidden, weight, targets, return_metrics=True, **kwargs)
    assert relative_error(loss, by_hand) < 1e-5
    for name, part in (("loss_sft", sft_part), ("loss_grpo", grpo_part), ("loss_gal", gal_part)):
        assert relative_error(metrics[name], part) < 1e-5, name


def test_current_old_logps_change_nothing(backend, chunk_rows):
    """GAL's coefficients come from the chunks' own log-probs: old_logps equal to the current policy's give the same
    loss and gradients as none."""
    batch, kwargs = dypo_inputs(backend, "current")
    args = (batch["hidden"], batch["weight"], batch["targets"])
    one = dypo_loss(*args, **kwargs)
    kwargs["old_logps"] = None
    two = dypo_loss(*args, **kwargs)
    assert relative_error(one, two) < 1e-6
    for grad_one, grad_two in zip(gradients(one, batch), gradients(two, batch)):
        assert relative_error(grad_one, grad_two) < 1e-6


def test_rl_rows_only_with_alpha_one_is_grpo(backend):
    batch, kwargs = dypo_inputs(backend, "stale")
    kwargs.update(route=torch.full((len(ROUTE),), int(Route.RL), device=backend), alpha=1.0,
                  advantages=torch.randn(len(ROUTE), generator=batch["generator"]).to(backend))
    args = (batch["hidden"], batch["weight"], batch["targets"])
    loss = dypo_loss(*args, **kwargs)
    grpo = fused_grpo_loss(*args, kwargs["advantages"], mask=kwargs["mask"], old_logps=kwargs["old_logps"],
                           ref_logps=kwargs["ref_logps"], beta=0.05, eps_high=0.28, bias=kwargs["bias"],
                           temperature=kwargs["temperature"])
    assert relative_error(loss, grpo) < 1e-6
    for grad, ref in zip(gradients(loss, batch), gradients(grpo, batch)):
        assert relative_error(grad, ref) < 1e-6


def test_only_skipped_rows_give_zero_with_zero_gradients(backend):
    batch, kwargs = dypo_inputs(backend)
    kwargs["route"] = torch.zeros(len(ROUTE), dtype=torch.long, device=backend)
    loss = dypo_loss(batch["hidden"], batch["weight"], batch["targets"], **kwargs)
    assert loss.item() == 0.0
    assert all(torch.all(g == 0) for g in gradients(loss, batch))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("only", [Route.SFT, Route.RL])
def test_a_batch_with_one_route_only_matches_the_reference(backend, loss_type, only):
    """Micro-batches of a trainer hold only SFT or only RL rows: the missing part weighs nothing (dr_grpo divided
    by zero rows before), and SFT rows alone need no reference log-probs even with beta_kl > 0."""
    batch, kwargs = dypo_inputs(backend, "stale")
    keep = [route in (only, Route.SKIP) for route in ROUTE]
    kwargs["route"] = torch.where(torch.tensor(keep).to(backend), kwargs["route"], int(Route.SKIP))
    kwargs["loss_type"] = loss_type
    args = (batch["hidden"], batch["weight"], batch["targets"])
    if only == Route.SFT:
        kwargs["ref_logps"] = None
    loss = dypo_loss(*args, **kwargs)
    expected = reference.dypo_loss(*args, **{**kwargs, "beta_kl": 0.0 if only == Route.SFT else 0.05})
    assert relative_error(loss, expected) < 1e-5
    for grad, ref in zip(gradients(loss, batch), gradients(expected, batch)):
        assert relative_error(grad, ref) < 1e-5
    if only == Route.RL:
        with pytest.raises(ValueError, match="beta_kl=0.05 > 0 needs ref_logps"):
            dypo_loss(*args, **{**kwargs, "ref_logps": None})


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("old", ["none", "stale"])
def test_parts_given_the_whole_batch_totals_add_up_to_the_whole(backend, chunk_rows, loss_type, old):
    """How a trainer splits an update into micro-batches or ranks: each part, normalised by the whole batch's
    totals, contributes its share, so that the sum is the whole batch's loss, gradients and loss terms."""
    batch, kwargs = dypo_inputs(backend, old)
    kwargs["loss_type"] = loss_type
    args = (batch["hidden"], batch["weight"], batch["targets"])
    whole, whole_metrics = dypo_loss(*args, return_metrics=True, **kwargs)
    totals = batch_totals(mask=kwargs["mask"], route=kwargs["route"], rewards=kwargs["rewards"],
                          group_index=kwargs["group_index"])
    assert totals == BatchTotals(prompts_rl=2, prompts_sft=1, sequences_rl=6, sequences_sft=2,
                                 tokens_rl=int(kwargs["mask"][[0, 2, 3, 5, 7, 8]].sum()),
                                 tokens_sft=int(kwargs["mask"][[1, 6]].sum()), max_length=8, gal_groups=2)
    assert relative_error(dypo_loss(*args, batch_totals=totals, **kwargs), whole) < 1e-6
    total, part_totals, part_metrics = 0.0, [], []
    for groups in ([0, 1], [2, 3]):
        rows = torch.tensor([i for i, g in enumerate(GROUP_INDEX) if g in groups], device=backend)
        part = {name: value[rows] if isinstance(value, torch.Tensor) and value.shape[0] == len(ROUTE) else value
                for name, value in kwargs.items()}
        part["group_index"] = torch.unique(part["group_index"], return_inverse=True)[1]
        loss, metrics = dypo_loss(batch["hidden"][rows], batch["weight"], batch["targets"][rows], batch_totals=totals,
                                  return_metrics=True, **part)
        total = total + loss
        part_metrics.append(metrics)
        part_totals.append(batch_totals(mask=part["mask"], route=part["route"], rewards=part["rewards"],
                                        group_index=part["group_index"]))
    assert BatchTotals.combine(part_totals) == totals
    assert relative_error(total, whole) < 1e-5
    for grad, expected in zip(gradients(total, batch), gradients(whole, batch)):
        assert relative_error(grad, expected) < 1e-5
    for name in ("loss_sft", "loss_grpo", "loss_gal"):
        assert sum(float(m.get(name, 0.0)) for m in part_metrics) == pytest.approx(float(whole_metrics[name]),
                                                                                   rel=1e-5, abs=1e-7), name


def test_batch_totals_smaller_than_the_batch_are_refused():
    batch, kwargs = dypo_inputs("cpu")
    totals = batch_totals(mask=kwargs["mask"], route=kwargs["route"], rewards=kwargs["rewards"],
                          group_index=kwargs["group_index"])
    args = (batch["hidden"], batch["weight"], batch["targets"])
    with pytest.raises(ValueError, match="batch_totals .* counts less than this batch holds \\(tokens_rl"):
        dypo_loss(*args, batch_totals=totals._replace(tokens_rl=1), **kwargs)
    with pytest.raises(TypeError, match="batch_totals must be a BatchTotals"):
        dypo_loss(*args, batch_totals=tuple(totals), **kwargs)


def test_rollout_group_of_one_is_valid(backend, chunk_rows):
    batch, kwargs = dypo_inputs(backend)
    kwargs["group_index"] = torch.tensor([0, 1, 0, 2, 3, 2, 1, 0, 4, 3]).to(backend)  # row 8: an RL group of one
    args = (batch["hidden"], batch["weight"], batch["targets"])
    loss, metrics = dypo_loss(*args, return_metrics=True, **kwargs)
    expected = reference.dypo_loss(*args, **kwargs)
    assert relative_error(loss, expected) < 1e-5
    assert metrics["num_prompts_rl"] == 3
    for grad, ref in zip(gradients(loss, batch), gradients(expected, batch)):
        assert relative_error(grad, ref) < 1e-5


def test_two_calls_give_identical_bits(backend, request):
    if request.node.backend_name == "triton" and HAS_CUDA:
        pytest.skip("the CUDA gradient kernel adds tiles with atomics (documented)")
    batch, kwargs = dypo_inputs(backend, "stale")
    args = (batch["hidden"], batch["weight"], batch["targets"])
    first, second = (dypo_loss(*args, **kwargs) for _ in range(2))
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(gradients(first, batch), gradients(second, batch)))


def bad_settings():
    rl_and_sft = torch.tensor(GROUP_INDEX)
    rl_and_sft[1] = 0  # an SFT row in prompt 0, whose other rows are RL
    return [
        (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"), (dict(gamma=-1.0), "gamma"),
        (dict(beta_gal=-1.0), "beta_gal"), (dict(beta_kl=-0.1), "beta_kl"), (dict(eps_low=1.0), "eps_low"),
        (dict(loss_type="sum"), "loss_type.*'grpo', 'bnpo', 'dapo', 'dr_grpo'"),
        (dict(route=torch.tensor([1, 2, 1, 1, 0, 1, 2, 1, 3, 0])), "route.*SKIP=0, RL=1, SFT=2"),
        (dict(route=torch.ones(9, dtype=torch.long)), "route"),
        (dict(group_index=rl_and_sft), "groups \\[0\\].*both RL and SFT"),
        (dict(group_index=torch.tensor(GROUP_INDEX) * 2), "group_index"),
        (dict(rewards=torch.tensor(REWARDS[:-1] + [float("inf")])), "rewards"),
        (dict(advantages=torch.zeros(3)), "advantages"),
        (dict(old_logps=torch.zeros(10, 7)), "old_logps"),
        (dict(mask=torch.ones(10, 7, dtype=torch.bool)), "mask"),
        (dict(ref_logps=None), "ref_logps"),  # beta_kl > 0 needs them
        (dict(temperature=0), "temperature"),
        (dict(mask=torch.full((10, 8), 0.5)), "mask"),
        (dict(loss_type="vespo"), "vespo's sequence weights are fused_grpo_loss's only"),
        (dict(loss_type="cispo", delta=1.5), "delta"),
        (dict(entropy_coef=float("inf")), "entropy_coef"),
        (dict(old_logps=torch.full((10, 8), float("nan"))), "old_logps"),
    ]


@pytest.mark.parametrize("changes,match", bad_settings())
def test_bad_input_raises_naming_the_argument(changes, match):
    batch, kwargs = dypo_inputs("cpu")
    kwargs.update(changes)
    with pytest.raises((ValueError, TypeError), match=match):
        dypo_loss(batch["hidden"], batch["weight"], batch["targets"], **kwargs)


def test_nan_padding_outside_the_mask_is_not_read(backend):
    batch, kwargs = dypo_inputs(backend, "stale")
    args = (batch["hidden"], batch["weight"], batch["targets"])
    expected = dypo_loss(*args, **kwargs)
    for name in ("old_logps", "ref_logps"):
        kwargs[name] = kwargs[name].masked_fill(~kwargs["mask"], float("nan"))
    loss = dypo_loss(*args, **kwargs)
    assert torch.equal(loss, expected)
    assert all(torch.equal(a, b) for a, b in zip(gradients(loss, batch), gradients(expected, batch)))


def test_transposed_weight_view(backend):
    batch, kwargs = dypo_inputs(backend, "current")
    weight_t = batch["weight"].detach().T.contiguous().requires_grad_()  # [D, V]: its .T is a non-contiguous [V, D]
    loss = dypo_loss(batch["hidden"], weight_t.T, batch["targets"], **kwargs)
    expected = reference.dypo_loss(batch["hidden"], weight_t.T, batch["targets"], **kwargs)
    assert relative_error(loss, expected) < 1e-5
    (grad,), (ref,) = torch.autograd.grad(loss, [weight_t]), torch.autograd.grad(expected, [weight_t])
    assert relative_error(grad, ref) < 1e-5
