"""The teachers of ``--hard_loss kl|sft_kl``: the hard prompts' divergence toward m teachers' next-token
distributions along the drawn teacher trajectory (prompt + solution; the loss is over the solution tokens).

Teachers are frozen causal LMs (``--teacher_models DIR [DIR ...]``, fused_multi_teacher_kl: a no-grad forward to
their last hidden states, their lm_head weights passed to the op, no logits built), or top-k log-probs stored in the
data records (``--teacher_topk_field``, fused_sparse_teacher_kl). ``--teacher_models builtin`` trains one tiny model
per rule-based teacher of the built-in task (task.py) by SFT on its solutions, cached on disk by a hash of its
recipe."""

import dataclasses
from pathlib import Path
from typing import List, Optional

import torch

from dypo import policy, pretrain, task
from dypo.batches import padded_batch
from dypo_kernels import Route, fused_multi_teacher_kl, fused_sparse_teacher_kl

BUILTIN = "builtin"
# how a built-in teacher is trained (with the student's hidden_size, num_layers and max_digits): part of its cache key
BUILTIN_RECIPE = {"format": 1, "corpus": "teacher", "steps": 400, "batch_size": 32, "learning_rate": 3e-3, "seed": 0}


def builtin_recipes(config):
    """One recipe per rule-based teacher of the built-in task (its solution style), for the student's architecture."""
    return [{**BUILTIN_RECIPE, "style": style, "hidden_size": config.hidden_size, "num_layers": config.num_layers,
             "max_digits": config.max_digits} for style in range(task.TEACHER_STYLES)]


def load_teachers(config, student, runtime, say=print):
    """The frozen teacher models of ``--teacher_models`` on the runtime's device, each checked to share the
    student's vocabulary (lm_head rows) and to compute its logits as lm_head(last hidden state); a ModelError naming
    the option otherwise."""
    if list(config.teacher_models) == [BUILTIN]:
        directories = [pretrain.cached_model(recipe, say) for recipe in builtin_recipes(config)]
    else:
        directories = [Path(directory) for directory in config.teacher_models]
    vocabulary = policy.lm_head(student)[0].shape[0]
    teachers = []
    for directory in directories:
        with torch.random.fork_rng(devices=[]):  # loading must not move the student's random state
            model = policy.pretrained_model(directory, runtime.attn_implementation, option="--teacher_models")
        rows = policy.lm_head(model)[0].shape[0]
        if rows != vocabulary:
            raise policy.ModelError(f"--teacher_models {directory}: its vocabulary has {rows} tokens, the student's "
                                    f"{vocabulary}; the teachers must share the student's vocabulary")
        model.to(runtime.device).eval().requires_grad_(False)
        policy.check_head(model, directory, runtime, option="--teacher_models")
        teachers.append(model)
    return teachers


@dataclasses.dataclass
class HardInputs:
    """What the KL needs of one batch: the indices of its hard (SFT) rows, the width of their positions, their
    solution-token mask [S, W], and the teachers' side: last hidden states [S, W, D_i] and lm_head (weight, bias)
    of each model, or the stored top-k ids and log-probs [S, W, k] of each teacher."""

    rows: torch.Tensor
    width: int
    mask: torch.Tensor
    hiddens: Optional[List[torch.Tensor]] = None
    heads: Optional[List[tuple]] = None
    topk_ids: Optional[List[torch.Tensor]] = None
    topk_logps: Optional[List[torch.Tensor]] = None


class HardKL:
    """The divergence of the student from the teachers on the hard prompts' solution tokens: a token mean over the
    batch's SFT rows, computed by the library's op (fused_multi_teacher_kl for models, fused_sparse_teacher_kl for
    stored top-k)."""

    def __init__(self, config, runtime, models=None):
        self.config, self.runtime, self.models = config, runtime, models

    def inputs(self, groups, pad_id, device) -> Optional[HardInputs]:
        """The batch's hard rows (in loss_batch's row order) with the teachers' side, or None when it has none.
        Teacher models run here under no_grad, to their last hidden states only."""
        rows = [(i, row) for i, (route, row) in enumerate((group.route, row) for group in groups for row in group.rows)
                if route == Route.SFT]
        if not rows:
            return None
        ids, attention, _, mask = padded_batch([row for _, row in rows], pad_id)
        hard = HardInputs(torch.tensor([i for i, _ in rows], device=device), mask.shape[1], mask.to(device))
        if self.models is None:
            topk_ids, topk_logps = topk_tensors([row for _, row in rows], mask)
            hard.topk_ids, hard.topk_logps = [t.to(device) for t in topk_ids], [t.to(device) for t in topk_logps]
            return hard
        dtype = self.runtime.autocast_dtype  # the student's hidden states and weight reach the op in it too
        ids, attention = ids.to(device), attention.to(device)
        hard.hiddens, hard.heads = [], []
        for model in self.models:
            with torch.no_grad():
                hidden = policy.last_hidden(model, ids, attention, self.runtime)[:, :-1]
            weight, bias = policy.lm_head(model)
            hard.hiddens.append(hidden if dtype is None else hidden.to(dtype))
            hard.heads.append((weight, bias) if dtype is None else
                              (weight.to(dtype), None if bias is None else bias.to(dtype)))
        return hard

    def loss(self, hidden, weight, bias, hard: HardInputs):
        """(the KL's token mean over the hard rows' solution tokens, the number of those tokens); ``hidden`` is the
        student's [B, L - 1, D] of the whole batch, differentiable."""
        student = hidden.index_select(0, hard.rows)[:, :hard.width]
        config = self.config
        if self.models is not None:
            value, metrics = fused_multi_teacher_kl(
                student, weight, hard.hiddens, [w for w, _ in hard.heads], teacher_biases=[b for _, b in hard.heads],
                mask=hard.mask, divergence=config.kl_divergence, aggregate=config.kl_aggregate,
                temperature=config.temperature, student_bias=bias, return_metrics=True)
        else:
            value, metrics = fused_sparse_teacher_kl(student, weight, hard.topk_ids, hard.topk_logps, mask=hard.mask,
                                                     temperature=config.temperature, student_bias=bias,
                                                     return_metrics=True)
        return value, metrics["num_tokens"]


def topk_tensors(rows, mask):
    """Each teacher's stored top-k of the rows' solution tokens as ids and log-probs [S, W, k] (positions outside
    ``mask`` hold ids 0..k-1 with log-prob -inf: valid inputs that the op drops)."""
    layout = rows[0].teacher_topk
    count, k = len(layout["ids"]), len(layout["ids"][0][0])
    ids = torch.arange(k).expand(count, *mask.shape, k).clone()
    logps = torch.full((count, *mask.shape, k), float("-inf"))
    for i, row in enumerate(rows):
        positions = slice(row.prompt_length - 1, len(row.ids) - 1)
        ids[:, i, positions] = torch.tensor(row.teacher_topk["ids"])
        logps[:, i, positions] = torch.tensor(row.teacher_topk["logps"], dtype=torch.float32)
    return list(ids.unbind(0)), list(logps.unbind(0))
