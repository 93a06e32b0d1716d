"""The oracle checked against independent formulations, so that the fused ops are not tested against a mistake."""

import torch
import torch.nn.functional as F

from dypo_kernels import Grade, reference


def test_group_advantages_match_grouped_torch_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.3, 0.9, 0.2])
    out = reference.group_advantages(rewards, group_size=3)
    grouped = rewards.double().view(4, 3)
    expected = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)
    assert torch.allclose(out.advantages, expected.view(-1))
    assert out.grade.tolist() == [Grade.MID, Grade.EASY, Grade.HARD, Grade.MID]
    assert out.num_success.tolist() == [1, 3, 0, 1]


def test_ragged_group_index_equals_sorted_uniform_groups():
    rewards = torch.rand(8)
    permutation = torch.randperm(8)
    uniform = reference.group_advantages(rewards, group_size=4)
    ragged = reference.group_advantages(rewards[permutation], group_index=(permutation // 4))
    assert torch.allclose(ragged.advantages, uniform.advantages[permutation])


def test_gal_with_one_success_and_one_failure_is_the_dpo_loss():
    seq_logps, ref_seq_logps = torch.randn(6), torch.randn(6)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    loss = reference.gal_loss(seq_logps, rewards, ref_seq_logps=ref_seq_logps, group_size=2, beta=0.5)
    margins = (seq_logps - ref_seq_logps).double().view(3, 2)
    chosen = torch.where(rewards.view(3, 2)[:, 0] > 0, margins[:, 0], margins[:, 1])
    rejected = torch.where(rewards.view(3, 2)[:, 0] > 0, margins[:, 1], margins[:, 0])
    assert torch.allclose(loss, -F.logsigmoid(0.5 * (chosen - rejected)).mean())


def test_gal_without_pairs_is_a_zero_that_backpropagates():
    seq_logps = torch.randn(4, requires_grad=True)
    loss = reference.gal_loss(seq_logps, torch.ones(4), group_size=2)
    loss.backward()
    assert loss.item() == 0 and torch.all(seq_logps.grad == 0)


def test_one_teacher_forward_kl_is_torch_kl_div():
    hidden, weight = torch.randn(5, 8), torch.randn(30, 8)
    teacher_hidden, teacher_weight = torch.randn(5, 12), torch.randn(30, 12)
    loss = reference.multi_teacher_kl(hidden, weight, [teacher_hidden], [teacher_weight], temperature=2.0)
    student = torch.log_softmax(hidden.double() @ weight.double().T / 2.0, -1)
    teacher = torch.log_softmax(teacher_hidden.double() @ teacher_weight.double().T / 2.0, -1)
    expected = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    assert torch.allclose(loss, expected)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    args = (torch.randn(4, 8), torch.randn(20, 8), [torch.randn(4, 8)], [torch.randn(20, 8)])
    for beta, divergence in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = reference.multi_teacher_kl(*args, divergence="jsd", jsd_beta=beta)
        assert torch.allclose(jsd, reference.multi_teacher_kl(*args, divergence=divergence))


def test_sft_token_mean_is_cross_entropy():
    hidden, weight = torch.randn(2, 6, 8), torch.randn(25, 8)
    targets = torch.randint(0, 25, (2, 6))
    targets[0, :2] = -100
    loss = reference.sft_loss(hidden, weight, targets)
    expected = F.cross_entropy((hidden.double() @ weight.double().T).view(-1, 25), targets.view(-1))
    assert torch.allclose(loss, expected)
