"""The sweep engine (dypo_kernels/sweep.py) across every op: chunk planning, FLOP counted from the matrix products
actually dispatched, bitwise determinism, both implementations agreeing, and the impl / chunk_bytes keywords."""

import functools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dypo_kernels import Route, fused_grpo_loss, fused_linear_logprobs, fused_sft_loss, fused_sparse_teacher_kl
from dypo_kernels.sweep import Chunk, whole_group_chunks
from tests.batches import OP_SIZES, OPS, gradients, op_inputs


@pytest.mark.parametrize("tokens,sequences,capacity,free_tokens,expected", [
    ([3, 4, 2, 5, 6], [1, 2, 1, 2, 2], 7, 0, [(0, 7, 0, 3, 0, 2), (7, 14, 3, 6, 2, 4), (14, 20, 6, 8, 4, 5)]),
    ([3, 0, 4, 0], [1, 0, 2, 0], 7, 0, [(0, 7, 0, 3, 0, 4)]),
    ([0, 0], [0, 0], 7, 0, []),
    ([3, 2], [1, 1], 7, 10, [(0, 7, 0, 2, 0, 2), (7, 14, 2, 2, 2, 2), (14, 15, 2, 2, 2, 2)]),
    ([], [], 7, 3, [(0, 3, 0, 0, 0, 0)]),
    ([3, 4, 2], [1, 1, 1], float("inf"), 5, [(0, 14, 0, 3, 0, 3)]),
    # a group larger than the capacity: every chunk grows to hold the largest group
    ([3, 8, 2], [1, 2, 1], 5, 4, [(0, 3, 0, 1, 0, 1), (3, 11, 1, 3, 1, 2), (11, 17, 3, 4, 2, 3)]),
])
def test_chunks_hold_whole_groups_then_free_tokens(tokens, sequences, capacity, free_tokens, expected):
    assert whole_group_chunks(tokens, sequences, capacity, free_tokens) == [Chunk(*c) for c in expected]


B, T, D, V, D_TEACHER = OP_SIZES


def every_op(device):
    """(name -> (loss closure, kept tokens, extra product FLOP per kept token beyond the student's head), the
    operands)."""
    operands, data = op_inputs(device)
    tokens = int(data["mask"].sum())
    with_pairs = (data["group_index"] == 0) | (data["group_index"] == 2)  # GAL: groups 1 and 3 have no pair
    counted = {"dypo": int(data["mask"][data["route"] != Route.SKIP].sum()), "gal": int(data["mask"][with_pairs].sum())}
    return {name: (functools.partial(call, operands, data), counted.get(name, tokens),
                   2 * D_TEACHER * V if name == "kl" else 0) for name, call in OPS.items()}, operands


class ProductFlop(TorchDispatchMode):
    """FLOP of the matrix products dispatched (mm, addmm, addmm_, bmm): FlopCounterMode misses the in-place addmm_."""

    PRODUCTS = {"mm", "addmm", "addmm_", "bmm"}

    def __init__(self):
        super().__init__()
        self.flop = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.PRODUCTS:
            a, b = (args[1], args[2]) if name.startswith("addmm") else (args[0], args[1])
            self.flop += 2 * math.prod(a.shape) * b.shape[-1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", list(OPS))
def test_flop_of_every_op(backend, request, op):
    """Losses 6NDV (their gradients formed in the forward), scoring under no_grad 2NDV, fused_linear_logprobs
    with autograd 8NDV; the KL adds its teachers' projections. Counted where the products run as torch products
    (the chunked impl)."""
    if request.node.impl_name != "chunked":
        pytest.skip("the fused impl's products run inside its Triton kernels")
    ops, batch = every_op(backend)
    loss_fn, tokens, teacher_flop = ops[op]
    head = 2 * D * V
    with ProductFlop() as forward:
        loss = loss_fn()
    with ProductFlop() as backward:
        gradients(loss, batch)
    with torch.no_grad(), ProductFlop() as scoring:
        loss_fn()
    if op == "logprobs":
        assert (forward.flop, backward.flop) == (tokens * head, 3 * tokens * head)
    else:
        assert (forward.flop, backward.flop) == (tokens * (3 * head + teacher_flop), 0)
    assert scoring.flop == tokens * (head + teacher_flop)


@pytest.mark.parametrize("op", list(OPS))
def test_chunked_is_bitwise_deterministic(backend, request, op):
    if request.node.impl_name != "chunked":
        pytest.skip("the fused impl adds its tiles with atomics: not deterministic on a GPU")
    results = []
    for _ in range(2):
        ops, batch = every_op(backend)
        loss = ops[op][0]()
        results.append([loss.detach(), *gradients(loss, batch)])
    assert all(torch.equal(first, second) for first, second in zip(*results))


@pytest.mark.parametrize("op", ["logprobs", "grpo", "sft", "gal", "dypo"])
def test_chunked_and_fused_agree(backend, request, op, monkeypatch):
    if request.node.backend_name != "triton" or request.node.impl_name != "chunked":
        pytest.skip("both impls run on the Triton backend")
    results = {}
    for impl in ("chunked", "fused"):
        monkeypatch.setenv("DYPO_KERNELS_IMPL", impl)
        ops, batch = every_op(backend)
        loss = ops[op][0]()
        results[impl] = [loss.detach(), *gradients(loss, batch)]
    for chunked, fused in zip(results["chunked"], results["fused"]):
        assert torch.allclose(chunked, fused, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", list(OPS))
def test_double_backward_is_an_error(op):
    """The backward is not itself differentiable: a second-order gradient raises instead of coming out wrong (the
    message depends on whether the upstream gradient requires grad)."""
    ops, operands = every_op("cpu")
    grad_weight, = torch.autograd.grad(ops[op][0](), operands["weight"], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad_weight.pow(2).sum().backward()


def test_impl_and_chunk_bytes_are_checked(monkeypatch):
    operands, data = op_inputs("cpu")
    args = (operands["hidden"], operands["weight"], data["targets"])
    monkeypatch.setenv("DYPO_KERNELS_BACKEND", "torch")
    with pytest.raises(ValueError, match="impl must be one of 'chunked', 'fused'"):
        fused_linear_logprobs(*args, impl="tiles")
    with pytest.raises(ValueError, match="impl='fused'.*CUDA"):
        fused_sft_loss(*args, impl="fused")
    with pytest.raises(ValueError, match="no register-tile implementation"):
        fused_sparse_teacher_kl(*args[:2], [torch.zeros(B, T, 1, dtype=torch.long)],
                                [torch.zeros(B, T, 1)], impl="fused")
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="chunk_bytes"):
            fused_sft_loss(*args, chunk_bytes=bad)
    monkeypatch.setenv("DYPO_KERNELS_IMPL", "tiles")
    with pytest.raises(ValueError, match="DYPO_KERNELS_IMPL='tiles'"):
        fused_linear_logprobs(*args)
    monkeypatch.setenv("DYPO_KERNELS_IMPL", "chunked")
    monkeypatch.setenv("DYPO_KERNELS_CHUNK_BYTES", "lots")
    with pytest.raises(ValueError, match="DYPO_KERNELS_CHUNK_BYTES='lots'"):
        fused_linear_logprobs(*args)


def test_chunk_bytes_bounds_the_chunk(monkeypatch):
    """The keyword sets the rows per chunk: the products see chunks of budget / (bytes per logit * V) rows."""
    from dypo_kernels import sweep

    monkeypatch.setenv("DYPO_KERNELS_BACKEND", "torch")
    operands, data = op_inputs("cpu")
    seen = []
    chunk_logits = sweep.chunk_logits
    monkeypatch.setattr(sweep, "chunk_logits", lambda hidden, *a, **k: seen.append(hidden.shape[0]) or
                        chunk_logits(hidden, *a, **k))
    fused_sft_loss(operands["hidden"], operands["weight"], data["targets"], chunk_bytes=5 * 12 * V)
    assert max(seen) == 5 and sum(seen) == int((data["targets"] != -100).sum()) > 5


class HostSyncs(TorchDispatchMode):
    """Counts the operations that make the host wait for the device: scalar reads (.item(), int(), bool()),
    nonzero, bincount, unique, boolean indexing, repeat_interleave without output_size, and tolist (patched in:
    it does not dispatch)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "bincount", "_unique2", "unique_dim", "unique_consecutive",
               "masked_select"}

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        tolist = torch.Tensor.tolist

        def counted_tolist(tensor):
            self.count += 1
            return tolist(tensor)

        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        indices = args[1] if name in ("index", "index_put", "index_put_") else ()
        self.count += (name in self.SYNCING
                       or (name == "repeat_interleave" and "output_size" not in (kwargs or {}))
                       or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None))
        return func(*args, **(kwargs or {}))


# forward + backward of each op at B 10, 4 groups: the one read of its checks and counts, plus GAL's chunk plan
HOST_SYNCS = {"logprobs": 1, "grpo": 1, "sft": 1, "gal": 2, "dypo": 2, "kl": 1, "sparse_kl": 1}


@pytest.mark.parametrize("op", list(HOST_SYNCS))
def test_host_syncs_of_every_op(op, monkeypatch):
    monkeypatch.setenv("DYPO_KERNELS_BACKEND", "torch")
    monkeypatch.setenv("DYPO_KERNELS_CHUNK_BYTES", str(5 * 12 * V))  # several chunks: none may sync
    ops, batch = every_op("cpu")
    with HostSyncs(monkeypatch) as syncs:
        gradients(ops[op][0](), batch)
    assert syncs.count == HOST_SYNCS[op]


@pytest.mark.parametrize("settings", [dict(importance_sampling_level="sequence"), dict(loss_type="vespo")])
def test_host_syncs_of_the_sequence_level_ratios(settings, monkeypatch):
    """GSPO and VESPO: the checks with the token count, and the sequences' sizes for the whole-sequence chunks."""
    monkeypatch.setenv("DYPO_KERNELS_BACKEND", "torch")
    monkeypatch.setenv("DYPO_KERNELS_CHUNK_BYTES", str(5 * 12 * V))
    operands, data = op_inputs("cpu")
    with HostSyncs(monkeypatch) as syncs:
        loss = fused_grpo_loss(operands["hidden"], operands["weight"], data["targets"], data["advantages"],
                               mask=data["mask"], bias=operands["bias"], **settings)
        gradients(loss, operands)
    assert syncs.count == 2


def test_host_syncs_of_the_sequence_ops(monkeypatch):
    from dypo_kernels import batch_totals, gal_loss, group_advantages

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    index = torch.tensor([1, 0, 1, 0])
    with HostSyncs(monkeypatch) as syncs:
        group_advantages(rewards, group_index=index)
        gal_loss(torch.randn(4, requires_grad=True), rewards, group_index=index)
        batch_totals(mask=torch.ones(4, 3, dtype=torch.bool), route=torch.tensor([1, 1, 2, 2]), rewards=rewards,
                     group_index=torch.tensor([0, 0, 1, 1]))
    assert syncs.count == 3
