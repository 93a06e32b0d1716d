"""The tokens a loss uses and how it aggregates them: selection of the masked tokens without a host sync, and each
token's weight in the aggregation of a loss_type (GRPO, DAPO/BNPO, Dr.GRPO, and the variants CISPO, SAPO, LUSPO,
VESPO)."""

import torch

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo", "luspo", "vespo")
# how each loss_type aggregates its per-token terms (TRL 1.16's GRPOTrainer): the mean of each sequence's token mean;
# the mean over the batch's tokens; the sum over B x max_len; the sum over the tokens, mean over the sequences
AGGREGATIONS = {"grpo": "sequence_mean", "sapo": "sequence_mean", "bnpo": "token_mean", "dapo": "token_mean",
                "cispo": "token_mean", "vespo": "token_mean", "dr_grpo": "fixed", "luspo": "sequence_sum"}


def positions_of(flags, count):
    """The indices where the 1-d bool ``flags`` is set, in order, given their ``count``: nonzero without its host
    sync (each set flag scatters its index to its rank; the rest go to one spare slot)."""
    rank = torch.where(flags, flags.long().cumsum(0) - 1, count)
    positions = torch.empty(count + 1, dtype=torch.long, device=flags.device)
    return positions.scatter_(0, rank, torch.arange(flags.shape[0], device=flags.device))[:count]


def select_tokens(hidden, targets, mask, count, rows=None, packed=None):
    """The tokens a loss uses, dropped to ``[N, D]`` rows before any projection.

    hidden ``[B, T, D]`` (or packed rows ``[N', D]`` with ``packed``, their packing.Packed layout), targets and mask
    ``[B, T]``; ``rows``: the sequences to take, in this order (None: all, in order); ``count``: the number of their
    tokens where ``mask`` is set (a host int the op read with its checks). Returns (flat index into B*T, sequence of
    each token, hidden rows ``[N, D]`` contiguous, targets ``[N]`` int64). No host sync.
    """
    length = targets.shape[-1]
    if rows is None:
        kept = positions_of(mask.reshape(-1), count)
    else:
        within = positions_of(mask[rows].reshape(-1), count)
        kept = rows[torch.div(within, length, rounding_mode="floor")] * length + within % length
    sequence = torch.div(kept, length, rounding_mode="floor")
    hidden_rows = kept if packed is None else packed.index.reshape(-1)[kept]
    kept_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, hidden_rows).contiguous()
    kept_targets = targets.reshape(-1).index_select(0, kept).long().contiguous()
    return kept, sequence, kept_hidden, kept_targets


def token_weights(loss_type, mask, sequence, max_len=None, num_sequences=None, num_tokens=None):
    """Weight of each kept token in the aggregation of ``loss_type`` over the sequences of ``mask`` ``[B, T]``:
    "grpo"/"sapo" 1 / (B * len_i) (mean of each sequence's token mean); "bnpo"/"dapo"/"cispo"/"vespo" 1 / (tokens
    in the batch); "dr_grpo" 1 / (B * max_len), max_len defaulting to T; "luspo" 1 / B (each sequence's sum, as TRL: the
    mean over its tokens times its length). fp32 ``[N]`` for the tokens' sequences ``sequence``. ``num_sequences`` /
    ``num_tokens`` replace B / the batch's tokens when the batch is a part of a larger one."""
    mask = mask.float()
    sequences = mask.shape[0] if num_sequences is None else num_sequences
    aggregation = AGGREGATIONS[loss_type]
    if aggregation == "sequence_mean":
        lengths = mask.sum(-1).clamp(min=1)
        return 1.0 / (sequences * lengths[sequence])
    if aggregation == "sequence_sum":
        return torch.full(sequence.shape, 1.0 / max(sequences, 1), device=mask.device)
    if aggregation == "token_mean":
        tokens = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=torch.float32,
                                                                          device=mask.device)
        return (1.0 / tokens.clamp(min=1)).expand(sequence.shape[0]).contiguous()
    return torch.full(sequence.shape, 1.0 / (max(sequences, 1) * (max_len or mask.shape[-1])),
                      device=mask.device)


def token_mean(values):
    """Mean of a per-token diagnostic (0 for no token)."""
    return values.mean() if values.numel() else values.new_zeros(())
