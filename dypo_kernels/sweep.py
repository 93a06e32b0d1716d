"""The sweep engine: every op of the library runs on this one loop over chunks of rows (docs/design.md, "The
sweep engine"). Per chunk of r rows, as QuACK's chunked linear cross-entropy does it:

    logits    = (h_c W^T + b) / T       one matrix product with an fp32 result            2 r D V FLOP
    grad      = op_pass.chunk(...)      the op's vocabulary pass: its per-row outputs, and the gradient of its
                                        objective with respect to the raw logits, formed in fp32 and rounded once
                                        into a workspace of the operands' dtype            memory-bound
    grad_h_c  = grad W                  a matrix product                                   2 r D V
    grad_W   += grad^T h_c              in place into one fp32 buffer (beta = 1)           2 r D V

So a loss costs 6NDV FLOP with its gradients formed in the forward (the backward scales them), scoring under
torch.no_grad 2NDV, and the extra memory is the chunk (``chunk_bytes``) plus the fp32 gradients: never N x V.
There are no atomics: the same inputs give bitwise-identical results. ``impl="fused"`` replaces the loop by the
Triton register-tile kernels of linear_logprobs/triton_kernels.py (no workspace at all, 8NDV, fp32 atomics).

The op passes (logprob_pass.py's ``LogprobPass`` for every log-prob op; multi_teacher_kl's for the KL) are data
with a ``chunk(chunk, logits, workspace)`` method, a ``bytes_per_logit`` and a ``total()``; this module holds the loop,
the chunk layout and the autograd Function, nothing of any op's math.
"""


import math
import os
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

IMPLS = ("chunked", "fused")

IMPL_ENV = "DYPO_KERNELS_IMPL"

CHUNK_BYTES_ENV = "DYPO_KERNELS_CHUNK_BYTES"

# One chunk's logits and gradient workspace. On CUDA, at V = 151,936 in bf16, 1,664-row chunks in waves of two: each
# product has thousands of rows (its output tiles fill the GPU) and the fp32 weight-gradient accumulator is read and
# written once per 3,328 rows; on CPU the size that kept the sweep fastest at V = 32,768 on 2-core machines.
DEFAULT_CHUNK_BYTES = {"cuda": 2 * 2**30, "cpu": 128 * 2**20}


def chunked_supported_on_cuda():
    """torch.mm(..., out_dtype=torch.float32) for 16-bit CUDA operands arrived in torch 2.8."""
    major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return (major, minor) >= (2, 8)


def select_impl(impl, backend, device, has_fused=True):
    """The implementation an op runs: ``impl``, else DYPO_KERNELS_IMPL, else "chunked" (on CUDA with torch < 2.8,
    "fused"). Ops without a fused implementation run "chunked" whatever the environment says."""
    from_env = impl is None
    if from_env:
        impl = os.environ.get(IMPL_ENV) or None
    if impl is None:
        return "fused" if device.type == "cuda" and not chunked_supported_on_cuda() else "chunked"
    if impl not in IMPLS:
        source = f"{IMPL_ENV}={impl!r}" if from_env else f"impl={impl!r}"
        raise ValueError(f"{source}: impl must be one of {', '.join(map(repr, IMPLS))} (or None)")
    if impl == "fused" and not has_fused:
        if from_env:
            return "chunked"
        raise ValueError("impl='fused': this op has no register-tile implementation; use impl='chunked' or None")
    if impl == "fused" and backend != "triton":
        raise ValueError("impl='fused' runs the Triton register-tile kernels: it needs CUDA tensors (or "
                         "DYPO_KERNELS_BACKEND=triton with TRITON_INTERPRET=1); use impl='chunked' on CPU")
    if impl == "chunked" and device.type == "cuda" and not chunked_supported_on_cuda():
        raise ValueError(f"impl='chunked' on CUDA needs torch >= 2.8 (torch.mm with out_dtype); this is "
                         f"torch {torch.__version__}: use impl='fused'")
    return impl


def chunk_budget(chunk_bytes, device):
    """Bytes of one chunk's logits and workspace: ``chunk_bytes``, else DYPO_KERNELS_CHUNK_BYTES, else the
    device's default."""
    source = "chunk_bytes"
    if chunk_bytes is None and os.environ.get(CHUNK_BYTES_ENV):
        source, chunk_bytes = CHUNK_BYTES_ENV, os.environ[CHUNK_BYTES_ENV]
        try:
            chunk_bytes = int(chunk_bytes)
        except ValueError:
            raise ValueError(f"{CHUNK_BYTES_ENV}={chunk_bytes!r} must be a positive integer (bytes)") from None
    if chunk_bytes is None:
        return DEFAULT_CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"{source} must be a positive integer (bytes) or None, got {chunk_bytes!r}")
    return chunk_bytes


def rows_per_chunk(budget, vocab_size, bytes_per_logit, device):
    """Rows whose logits (and what the pass holds per logit) fit ``budget``; on CUDA a multiple of 128 when it can
    be, so that the products' tiles are full."""
    rows = max(1, budget // (vocab_size * bytes_per_logit))
    return rows - rows % 128 if device.type == "cuda" and rows >= 256 else rows


def chunk_layout(bytes_per_logit, weight, device, backend, impl, chunk_bytes):
    """(rows per chunk, rows per wave) within the chunk budget. On CPU the gradient is written over the logits and
    each chunk is its own wave. On Triton half the budget holds a chunk's fp32 logits and half the 16-bit gradients
    of the chunks that share one weight-gradient product: the wave's rows set how often that product reads and
    writes the fp32 [V, D] accumulator, 8VD bytes a wave (5 GB at V 151,936, D 4,096)."""
    if impl == "fused":
        return math.inf, math.inf
    budget = chunk_budget(chunk_bytes, device)
    vocab = weight.shape[0]
    if backend != "triton":
        rows = rows_per_chunk(budget, vocab, bytes_per_logit, device)
        return rows, rows
    rows = rows_per_chunk(budget // 2, vocab, bytes_per_logit, device)
    wave = budget // 2 // (vocab * (torch.finfo(workspace_dtype(weight, backend)).bits // 8))
    return rows, max(rows, wave)


def workspace_dtype(weight, backend):
    """The logit gradient's dtype: the operands' on Triton (CUDA's products take it); fp32 on the CPU backends,
    whose products run in fp32 and whose passes write the gradient over the logits."""
    return weight.dtype if backend == "triton" else torch.float32


class Chunk(NamedTuple):
    """Token rows [start, stop) of one step of the sweep; for ops that need whole groups (GAL), the sequences
    [first_sequence, last_sequence) and groups [first_group, last_group) whose tokens all lie in it.
    ``closes_wave``: the weight-gradient product of the wave this chunk ends runs after it."""

    start: int
    stop: int
    first_sequence: int = 0
    last_sequence: int = 0
    first_group: int = 0
    last_group: int = 0
    closes_wave: bool = True

    @property
    def rows(self):
        return slice(self.start, self.stop)


def even_chunks(count, rows):
    return [Chunk(start, min(start + rows, count)) for start in range(0, count, rows)]


def with_waves(chunks, wave_rows):
    """``chunks`` grouped into waves of at most ``wave_rows`` rows (a larger chunk is a wave of its own)."""
    marked, wave_start = [], 0
    for index, chunk in enumerate(chunks):
        if not marked or marked[-1].closes_wave:
            wave_start = chunk.start
        following = chunks[index + 1] if index + 1 < len(chunks) else None
        marked.append(chunk._replace(closes_wave=following is None or following.stop - wave_start > wave_rows))
    return marked


def whole_group_chunks(tokens_per_group, sequences_per_group, capacity, free_tokens=0):
    """Chunks over groups of consecutive tokens (``tokens_per_group``, each of ``sequences_per_group`` sequences),
    each group whole in one chunk, then ``free_tokens`` tokens that may be split anywhere. A chunk holds at most
    ``capacity`` tokens, or the largest group's when that is more: the chunk grows to hold the largest group, so
    the extra memory is max(capacity, largest group) rows of logits. Chunks without tokens are left out."""
    capacity = max([capacity, *tokens_per_group])
    chunks, start, stop, first_sequence, sequences, first_group = [], 0, 0, 0, 0, 0

    def close(group):
        nonlocal start, first_sequence, first_group
        if stop > start:
            chunks.append(Chunk(start, stop, first_sequence, sequences, first_group, group))
        start, first_sequence, first_group = stop, sequences, group

    for group, (tokens, count) in enumerate(zip(tokens_per_group, sequences_per_group)):
        if stop + tokens - start > capacity:
            close(group)
        stop, sequences = stop + tokens, sequences + count
    num_groups, remaining = len(tokens_per_group), free_tokens
    while remaining:
        if stop - start >= capacity:
            close(num_groups)
        taken = min(capacity - (stop - start), remaining)
        stop, remaining = stop + taken, remaining - taken
    close(num_groups)
    return chunks


def _product(a, b, out=None):
    """a @ b with an fp32 result: cuBLAS with an fp32 output for 16-bit CUDA operands; fp32 products on CPU."""
    if a.device.type == "cuda" and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def _accumulate_product(accumulator, a, b):
    """accumulator += a @ b in place, into the fp32 ``accumulator``."""
    if a.device.type == "cuda" and a.dtype != torch.float32:
        try:
            torch.addmm(accumulator, a, b, out_dtype=torch.float32, out=accumulator)
        except RuntimeError:  # torch 2.8/2.9 ask the added matrix to share the operands' dtype
            accumulator.add_(torch.mm(a, b, out_dtype=torch.float32))
        return
    accumulator.addmm_(a.float(), b.float())


def chunk_logits(hidden_rows, weight_operand, bias, out=None):
    """fp32 [r, V] logits h W^T + b of one chunk (into ``out`` if given), not yet divided by the temperature (the
    vocabulary passes do that, vocab_pass.divide_by_temperature); ``weight_operand`` as ``operand`` returns it,
    ``bias`` fp32."""
    logits = _product(hidden_rows, weight_operand.T, out=out)
    return logits if bias is None else logits.add_(bias)


def operand(tensor):
    """A product operand: CUDA tensors as they are (tensor cores), CPU ones in fp32 (one copy per sweep)."""
    return tensor if tensor.device.type == "cuda" else tensor.float()


def sweep(hidden, weight, bias, op_pass, chunks, *, needs_input_grad, impl="chunked"):
    """Runs ``op_pass`` over the rows ``hidden`` [N, D] (contiguous) of the head ``weight`` [V, D], ``bias`` [V] or
    None. Returns the fp32 gradients (hidden, weight, bias) of the pass's objective, None where not needed (and
    none at all, with no gradient work, when nothing is needed). ``chunks``: Chunk list covering the rows in order,
    in waves (with_waves): on Triton the chunks of a wave write their gradients into one workspace, and the wave
    takes one weight-gradient product."""
    if impl == "fused":
        return _fused_sweep(hidden, weight, bias, op_pass, needs_input_grad)
    device, count = hidden.device, hidden.shape[0]
    needs_hidden, needs_weight, needs_bias = needs_input_grad
    weight_operand = operand(weight)
    bias32 = None if bias is None else bias.float()
    grad_hidden = torch.empty(count, hidden.shape[1], dtype=torch.float32, device=device) if needs_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if needs_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=device) if needs_bias else None
    wave = None
    if any(needs_input_grad) and op_pass.backend == "triton":  # else the gradient is written over the logits
        wave = torch.empty(_largest_wave(chunks), weight.shape[0], dtype=workspace_dtype(weight, op_pass.backend),
                           device=device)
    wave_start = 0
    for chunk in chunks:
        if chunk.stop == chunk.start:
            continue
        hidden_rows = hidden[chunk.rows]
        logits = chunk_logits(hidden_rows, weight_operand, bias32)
        workspace = None
        if any(needs_input_grad):
            workspace = logits if wave is None else wave[chunk.start - wave_start:chunk.stop - wave_start]
        grad_logits = op_pass.chunk(chunk, logits, workspace)
        del logits  # one chunk's logits alive at a time
        if grad_logits is None:
            continue
        if needs_hidden:
            _product(grad_logits, weight_operand, out=grad_hidden[chunk.rows])
        if needs_bias:
            grad_bias += grad_logits.sum(0, dtype=torch.float32)
        if needs_weight and chunk.closes_wave:
            wave_rows = slice(chunk.start if wave is None else wave_start, chunk.stop)
            _accumulate_product(grad_weight, (grad_logits if wave is None else wave[:chunk.stop - wave_start]).T,
                                operand(hidden[wave_rows]))
        if chunk.closes_wave:
            wave_start = chunk.stop
        del grad_logits, workspace  # before the next chunk's logits are made
    return grad_hidden, grad_weight, grad_bias


def _largest_wave(chunks):
    largest, start = 0, 0
    for chunk in chunks:
        largest = max(largest, chunk.stop - start)
        if chunk.closes_wave:
            start = chunk.stop
    return largest


def _fused_sweep(hidden, weight, bias, op_pass, needs_input_grad):
    """The register-tile kernels: the forward kernel over all rows (2NDV), the pass's coefficients, then the
    gradient kernel (6NDV, the logit tiles recomputed, products added with fp32 atomics)."""
    from dypo_kernels.linear_logprobs import triton_kernels

    weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
    if op_pass.grad_logp is None:
        lse, target_logit, entropy = triton_kernels.forward(hidden, weight, bias, op_pass.targets,
                                                            op_pass.inv_temperature)
    else:  # fused_linear_logprobs' backward: the statistics are known
        lse, target_logit, entropy = op_pass.lse, None, op_pass.entropy
    coef_logp, coef_entropy = op_pass.coefficients(op_pass.whole_chunk(), lse, target_logit, entropy)
    if not any(needs_input_grad):
        return None, None, None
    return triton_kernels.backward(hidden, weight, bias, op_pass.targets, lse, entropy, coef_logp.contiguous(),
                                   None if coef_entropy is None else coef_entropy.contiguous(),
                                   op_pass.inv_temperature, needs_input_grad=needs_input_grad)


class SweepLoss(torch.autograd.Function):
    """loss = op_pass.total() after one sweep, for kept rows hidden ``[N, D]``, weight ``[V, D]``, bias ``[V]`` or
    None. The gradients are formed in the forward (when ``grad_enabled``: not under torch.no_grad) and scaled in the
    backward. Each loss awaiting its backward holds fp32 gradients of hidden and weight (N*D + V*D): sum micro-batch
    losses after their backward, not before."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, op_pass, chunks, impl, grad_enabled):
        needs = tuple(need and grad_enabled for need in ctx.needs_input_grad[:3])
        if hidden.shape[0]:
            grads = sweep(hidden, weight, bias, op_pass, chunks, needs_input_grad=needs, impl=impl)
        else:
            grads = tuple(torch.zeros(like.shape, dtype=torch.float32, device=like.device) if need else None
                          for like, need in zip((hidden, weight, bias), needs))
        ctx.save_for_backward(*grads)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (hidden, weight, bias))
        return op_pass.total()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grads = tuple(None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(ctx.saved_tensors,
                                                                                        ctx.dtypes))
        return (*grads, None, None, None, None)


def sweep_loss(hidden, weight, bias, op_pass, chunks, impl):
    """The loss of ``op_pass`` over the kept rows, through SweepLoss."""
    return SweepLoss.apply(hidden, weight, bias, op_pass, chunks, impl, torch.is_grad_enabled())


def loss_chunks(op_pass, hidden, weight, impl, chunk_bytes):
    """Even chunks of the kept rows, in waves, for a pass without groups."""
    rows, wave = chunk_layout(op_pass.bytes_per_logit, weight, hidden.device, op_pass.backend, impl, chunk_bytes)
    if hidden.shape[0] == 0:
        return [Chunk(0, 0)]
    return with_waves(even_chunks(hidden.shape[0], min(rows, hidden.shape[0])), wave)
