"""The pairs of GAL (DYPO paper eq. 14-15) in a padded [G, K, K] layout, unchecked: the one copy of GAL's math that
gal_loss, gal_coefficients and the sweep's GalTerms share."""

import torch
import torch.nn.functional as F

METRICS = ("num_pairs", "pair_accuracy", "mean_margin")


def group_layout(ids, checks):
    """(slot [B], width): each row's position within its group (ids 0..G-1, any order) and, as a Count read by
    ``checks``, the largest group's size, which shapes the padded [G, K] layout of the pairs."""
    count = ids.shape[0]
    order = torch.argsort(ids, stable=True)
    sizes = torch.zeros(count, dtype=torch.long, device=ids.device).index_add_(0, ids, torch.ones_like(ids))
    slot = torch.empty_like(ids)
    slot[order] = torch.arange(count, device=ids.device) - (sizes.cumsum(0) - sizes)[ids[order]]
    return slot, checks.count(sizes.max() if count else torch.zeros((), dtype=torch.long, device=ids.device))


def pair_terms(seq_logps, rewards, ref_seq_logps, group, slot, num_groups, width):
    """Pairwise margins d [G, K, K] (row s minus row f) and the pair mask (same group, R_s > R_f), unchecked, for
    sequences at (group, slot) of a padded [G, K] layout."""
    margins = seq_logps.float() if ref_seq_logps is None else seq_logps.float() - ref_seq_logps.float()
    padded_margin = margins.new_zeros(num_groups, width).index_put((group, slot), margins)
    padded_reward = margins.new_full((num_groups, width), float("-inf")).index_put((group, slot), rewards.float())
    present = torch.zeros(num_groups, width, dtype=torch.bool, device=group.device).index_put(
        (group, slot), torch.ones_like(slot, dtype=torch.bool))
    is_pair = present[:, :, None] & present[:, None, :] & (padded_reward[:, :, None] > padded_reward[:, None, :])
    return padded_margin[:, :, None] - padded_margin[:, None, :], is_pair


def pair_weights(is_pair, pair_groups=None):
    """1 / (pairs in the group * groups with pairs), per pair; 0 where there is no pair. ``pair_groups`` (an int
    or a 0-dim tensor) replaces the count of groups with pairs when the groups are a part of a batch."""
    pairs_per_group = is_pair.sum((1, 2)).float()
    if pair_groups is None:
        pair_groups = (pairs_per_group > 0).sum()
    return is_pair / (pairs_per_group.clamp(min=1) * torch.as_tensor(pair_groups).clamp(min=1))[:, None, None]


def loss_and_metrics(difference, is_pair, beta, pair_groups=None):
    pair_loss = torch.where(is_pair, -F.logsigmoid(beta * difference), 0.0)
    loss = (pair_loss * pair_weights(is_pair, pair_groups)).sum()
    num_pairs = is_pair.sum()
    with torch.no_grad():
        metrics = {"num_pairs": num_pairs,
                   "pair_accuracy": (is_pair & (difference > 0)).sum() / num_pairs.clamp(min=1),
                   "mean_margin": torch.where(is_pair, difference, 0.0).sum() / num_pairs.clamp(min=1)}
    return loss, metrics


def no_pair_metrics(device):
    """GAL's metrics of a batch without its rows."""
    return {"num_pairs": torch.zeros((), dtype=torch.long, device=device),
            "pair_accuracy": torch.zeros((), device=device), "mean_margin": torch.zeros((), device=device)}


def coefficients(difference, is_pair, beta, pair_groups, group, slot):
    """c_i of every sequence at (group, slot): minus its pulls as the successful s, plus as the failed f."""
    pull = pair_weights(is_pair, pair_groups) * beta * torch.sigmoid(-beta * difference)
    return (pull.sum(1) - pull.sum(2))[group, slot]


def has_pair(rewards, ids, num_groups):
    """bool ``[G]``: the groups (ids 0..G-1 of the rows) whose rewards are not all equal, the only ones with pairs."""
    rewards = rewards.float()
    highest = rewards.new_full((num_groups,), float("-inf")).scatter_reduce(0, ids, rewards, "amax")
    lowest = rewards.new_full((num_groups,), float("inf")).scatter_reduce(0, ids, rewards, "amin")
    return highest > lowest
