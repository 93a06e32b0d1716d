"""Rows as padded tensors: the no-gradient scoring of rollouts (their log-probs and entropy) and the batches that
dypo_loss trains on."""

import torch

from dypo import distributed
from dypo_kernels import Route, fused_linear_logprobs


def padded_batch(rows, pad_id):
    """Right-padded ids and attention mask [B, L]; targets (next tokens, 0 where unused) and the completion mask
    [B, L - 1]; on the host."""
    width = max(len(row.ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row.ids)] = torch.tensor(row.ids)
        attention[i, :len(row.ids)] = 1
        mask[i, row.prompt_length - 1:len(row.ids) - 1] = True  # positions predicting the completion tokens
    targets = ids[:, 1:].masked_fill(~mask, 0)
    return ids, attention, targets, mask


@torch.no_grad()
def completion_logprobs(head, rows, pad_id, device, temperature, entropy=False, batch_size=0):
    """Per-row log-probs of the completion tokens (lists) from a FusedHead (hidden states and the fused op, no
    logits), ``batch_size`` rows per forward (0: all at once); with ``entropy`` also the mean policy entropy over
    those tokens. One device-to-host copy per forward."""
    per_row, entropy_sum, tokens = [], 0.0, 0
    size = batch_size or len(rows)
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        ids, attention, targets, mask = padded_batch(chunk, pad_id)
        result = head(ids.to(device), attention.to(device), lambda hidden, weight, bias: fused_linear_logprobs(
            hidden, weight, targets.masked_fill(~mask, -100).to(device), bias=bias, temperature=temperature,
            return_entropy=entropy))
        distributed.reshard(head)  # under FSDP2 a forward without backward leaves the root gathered
        logps, token_entropy = (torch.stack([result[0].float(), result[1].float()]).cpu() if entropy else
                                (result.float().cpu(), None))
        per_row += [logps[i][mask[i]].tolist() for i in range(len(chunk))]
        if entropy:
            entropy_sum += token_entropy[mask].sum().item()
            tokens += int(mask.sum())
    if not entropy:
        return per_row
    return per_row, entropy_sum / max(tokens, 1)


def loss_batch(groups, pad_id, device):
    """The tensors of a batch of routed groups on ``device``, as dypo_loss takes them (and ids, attention for the
    policy's forward; ``off_policy``: the indices of luffy's teacher rows, or None)."""
    rows = [row for group in groups for row in group.rows]
    ids, attention, targets, mask = padded_batch(rows, pad_id)

    def logps_of(name):
        if not any(getattr(row, name) for row in rows):
            return None
        values = torch.zeros(mask.shape)
        for i, row in enumerate(rows):
            if getattr(row, name):
                values[i, mask[i]] = torch.tensor(getattr(row, name))
        return values.to(device)

    off_policy = [i for i, row in enumerate(rows) if row.off_policy]  # dypo_loss skips them (strategy luffy)
    return dict(ids=ids.to(device), attention=attention.to(device), targets=targets.to(device), mask=mask.to(device),
                route=torch.tensor([Route.SKIP if row.off_policy else group.route for group in groups
                                    for row in group.rows], device=device),
                off_policy=torch.tensor(off_policy, device=device) if off_policy else None,
                group_index=torch.tensor([g for g, group in enumerate(groups) for _ in group.rows], device=device),
                rewards=torch.tensor([row.reward for row in rows], device=device),
                advantages=torch.tensor([row.advantage for row in rows], device=device),
                old_logps=logps_of("old_logps"), ref_logps=logps_of("ref_logps"))
