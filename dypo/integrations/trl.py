"""DYPO inside TRL: ``DYPOTrainer`` is TRL's ``GRPOTrainer`` with DYPO's routing and fused loss.

    from dypo.integrations.trl import DYPOTrainer
    trainer = DYPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=dataset)  # + alpha=...

What changes against GRPOTrainer, and nothing else:
- after TRL has generated and scored a generation batch, each group of ``num_generations`` rollouts is graded
  (success: reward > 0.5) and routed by DYPO's rule (dypo.routing): easy groups are dropped, mid groups are
  trained by alpha GRPO + (1 - alpha) GAL, and a hard group's first row is replaced by a teacher solution from the
  dataset column ``teachers_field`` (default ``target``: a list of strings or of messages with a ``content``),
  drawn uniformly, for SFT (its other rows are dropped); ``switch_gate`` holds plain GRPO for the first optimizer
  steps;
- the generation batch is shuffled and split by whole groups (GAL pairs rollouts within a group), so
  ``per_device_train_batch_size`` must be a multiple of ``num_generations``;
- the training loss is ``dypo_loss`` on the policy's last hidden states and ``lm_head.weight``: the model runs
  through its (wrapped) forward with ``output_hidden_states=True, logits_to_keep=1``, so no [batch, tokens, vocab]
  logits are built. TRL's advantages, old and reference log-probs, ``beta``, ``use_bias_correction_kl``,
  ``epsilon``/``epsilon_high`` and ``temperature`` are used as they are; ``loss_type`` aggregates as TRL's does:
  grpo and bnpo over each micro-batch, dr_grpo over each micro-batch's rows times ``max_completion_length``, dapo
  over the whole generation batch of every process (``dypo_loss``'s ``batch_totals``: its tokens, and also its
  prompts, sequences and GAL groups), so that the micro-batches of an accumulation window add up to its share of
  the generation batch's loss.
  GAL's reference term exists when TRL has a reference model (``beta`` > 0), else GAL compares the policy's own
  sequence log-probs. Evaluation keeps TRL's own loss.
TRL's loss types grpo, bnpo, dr_grpo, dapo and its variants cispo (normalised as dapo), sapo and luspo (as grpo),
with ``delta``, the SAPO temperatures, sequence-level importance sampling (GSPO) and vLLM's importance-sampling
correction, are TRL's own loss when every group is mid and alpha is 1 (tested).
Refused, because the fused loss would silently ignore them or mean something else: FSDP and DeepSpeed ZeRO-3 (the
lm_head weight is read outside the forward), tool masks, top_entropy_quantile < 1, off_policy_mask_threshold, vespo
(fused_grpo_loss has it; dypo_loss does not), entropy_coef (dypo_loss's bonus is verl's, not TRL's token mean),
cast_lm_head_to_fp32, and models whose logits are not lm_head(last hidden state). Text-only models; tested on CPU
with one process (tests/integrations/test_trl.py).

The old and reference log-probs TRL computes under ``torch.no_grad`` (``_get_per_token_logps_and_entropies``) go
through ``fused_linear_logprobs`` on the decoder's last hidden states: 2NDV FLOP and no [tokens, vocab] tensor (TRL
1.16's own path is chunked too, in tiles of 4,096 tokens by 32,768 vocabulary entries). A plain ``GRPOTrainer``
gets the same with one line, ``patch_trl_log_probs(trainer)`` (or ``patch_trl_log_probs()`` for every
GRPOTrainer); ``fused_per_token_logps`` is the function under both.
"""

import functools
import random
import types

import torch
from accelerate.utils import gather_object
from trl import GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from dypo.metrics import LOSS_TERMS, WEIGHTS, read_metrics
from dypo.policy import Runtime, check_head
from dypo.routing import routes_of
from dypo_kernels import BatchTotals, Grade, Route, batch_totals, dypo_loss, fused_linear_logprobs, group_advantages
from dypo_kernels.combined import LOSS_TYPES
from dypo_kernels.grpo import check_importance_sampling_level

# the per-token tensors of a micro-batch, [rows, completion width]
COMPLETION_COLUMNS = ("completion_ids", "completion_mask", "old_per_token_logps", "ref_per_token_logps",
                      "sampling_per_token_logps")
# GRPOConfig options the fused loss cannot honour, with the value that is safe
UNSUPPORTED = {"top_entropy_quantile": 1.0, "off_policy_mask_threshold": None, "entropy_coef": 0.0,
               "cast_lm_head_to_fp32": False}
WHY = {"entropy_coef": "dypo_loss's entropy bonus is verl's (the RL rows' entropy aggregated as the loss type, "
                       "within DYPO's prompt shares), not TRL's token mean over every completion"}
# vLLM's importance-sampling ratio: [rows, completion width] for TRL's token modes, [rows, 1] for its sequence modes
IS_RATIO = "importance_sampling_ratio"
# the loss types TRL normalises over the generation batch's tokens (num_items_in_batch)
OVER_GENERATION = ("dapo", "cispo")


# text-config fields by which a model's logits are not lm_head(last hidden state) (the ones TRL's fused head reads):
# a soft cap, or a scale other than 1
SOFT_CAPS = ("final_logit_softcapping",)
LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


# old and reference log-probs -------------------------------------------------------------------------------------
def plain_head(model):
    """Whether the model's config leaves its logits lm_head(last hidden state): no soft cap, no logit scale."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return all(getattr(config, name, None) is None for name in SOFT_CAPS) and \
        all(getattr(config, name, None) in (None, 1, 1.0) for name in LOGIT_SCALES)


def fused_per_token_logps(model, input_ids, attention_mask, logits_to_keep, temperature=1.0, compute_entropy=False,
                          *, batch_size=None, cast_lm_head_to_fp32=False):
    """The log-probs (and entropies) of the last ``logits_to_keep`` tokens of ``input_ids``, as TRL's
    ``GRPOTrainer._get_per_token_logps_and_entropies`` returns them, from ``fused_linear_logprobs`` on the decoder's
    last hidden states under ``torch.no_grad``: no [rows, tokens, vocab] logits.

    Args:
        model: a text causal LM whose logits are lm_head(last hidden state) (``plain_head``): a transformers model,
            or a PEFT model around one, unwrapped from DDP. Runs under the caller's autocast.
        input_ids, attention_mask: ``[B, S]`` prompts and completions (TRL's ``prompt_completion_ids``).
        logits_to_keep: K, 0 < K < S, the completions' width: column j scores ``input_ids[:, S - K + j]``.
        temperature: the logits are divided by it (``GRPOConfig.temperature``).
        compute_entropy: also return the entropies.
        batch_size: rows per forward, as TRL chunks them (None: all rows at once).
        cast_lm_head_to_fp32: the head's product in float32 outside autocast (``GRPOConfig.cast_lm_head_to_fp32``).

    Returns:
        ``(logps, entropies)``, ``[B, K]`` float32 each (``entropies`` None without ``compute_entropy``), 0 where
        ``attention_mask`` is 0 (TRL's -100 labels), on the lm_head's device.

    Cost: the decoder's forward, then 2 B K D V FLOP (fused_linear_logprobs under no_grad); extra memory beyond the
    decoder's O(batch_size * S * D + V * D + chunk), never a [B, K, V] tensor. The decoder runs alone
    (``get_decoder()``, the backbone TRL's own fused head runs), not the whole model with ``output_hidden_states``,
    which would keep every layer's hidden states.
    """
    rows, width = input_ids.shape
    if not 0 < logits_to_keep < width:
        raise ValueError(f"logits_to_keep must lie in 1..{width - 1} (the sequence holds {width} tokens); got "
                         f"{logits_to_keep}")
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    batch_size = batch_size or rows
    logps, entropies = [], []
    with torch.no_grad():
        for start in range(0, rows, batch_size):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            hidden = hidden[:, width - logits_to_keep - 1:-1].to(weight.device)
            targets = ids[:, -logits_to_keep:].masked_fill(mask[:, -logits_to_keep:] == 0, -100).to(weight.device)
            if cast_lm_head_to_fp32:
                with torch.autocast(weight.device.type, enabled=False):
                    out = fused_linear_logprobs(hidden.float(), weight.float(), targets,
                                                bias=None if bias is None else bias.float(), temperature=temperature,
                                                return_entropy=compute_entropy)
            else:
                out = fused_linear_logprobs(hidden, weight.to(hidden.dtype), targets,
                                            bias=None if bias is None else bias.to(hidden.dtype),
                                            temperature=temperature, return_entropy=compute_entropy)
            logps.append(out[0] if compute_entropy else out)
            if compute_entropy:
                entropies.append(out[1])
    return torch.cat(logps), torch.cat(entropies) if compute_entropy else None


def fused_path_refusal(trainer, model, input_ids, logits_to_keep, compute_aux_loss=False, **multimodal):
    """Why the fused path cannot honour this ``_get_per_token_logps_and_entropies`` call, so that TRL's own path
    runs; None when it can."""
    if torch.is_grad_enabled():
        return "gradients are enabled (TRL's policy loss)"
    if compute_aux_loss:
        return "the MoE load-balancing loss needs the router logits"
    given = sorted(name for name, value in multimodal.items() if value is not None)
    if given:
        return f"multimodal inputs ({', '.join(given)})"
    deepspeed = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if getattr(trainer, "is_fsdp_enabled", False) or (deepspeed is not None and deepspeed.zero_stage == 3):
        return "FSDP and ZeRO-3 shard the lm_head weight read outside the forward"
    unwrapped = trainer.accelerator.unwrap_model(model)
    if getattr(getattr(unwrapped, "active_peft_config", None), "is_prompt_learning", False):
        return "prompt-learning PEFT adds its virtual tokens in its own forward"
    if not plain_head(unwrapped):
        return "the model's logits are soft-capped or scaled"
    if not 0 < logits_to_keep < input_ids.size(1):
        return "logits_to_keep covers the whole sequence"
    return None


def fused_logps_method(original):
    """``original`` (TRL's ``_get_per_token_logps_and_entropies``) with its no-grad calls, the old and reference
    log-probs, through ``fused_per_token_logps``: the same signature and return value ``(logps, entropies,
    aux_loss=None)``, the trainer's ``temperature``, the ``batch_size`` chunking, ``compute_entropy``,
    ``cast_lm_head_to_fp32`` and ``accelerator.autocast()``. ``original`` runs where ``fused_path_refusal`` says
    why the fused path cannot honour the call: gradients enabled (the policy's loss), ``compute_aux_loss``,
    multimodal inputs, FSDP / ZeRO-3, prompt-learning PEFT, soft-capped or scaled logits."""

    @functools.wraps(original)
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        if fused_path_refusal(self, model, input_ids, logits_to_keep, compute_aux_loss, **multimodal) is not None:
            return original(self, model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                            compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        with self.accelerator.autocast():
            logps, entropies = fused_per_token_logps(
                self.accelerator.unwrap_model(model), input_ids, attention_mask, logits_to_keep, self.temperature,
                compute_entropy, batch_size=batch_size,
                cast_lm_head_to_fp32=getattr(self.args, "cast_lm_head_to_fp32", False))
        return logps, entropies, None

    _get_per_token_logps_and_entropies.dypo_fused = True
    return _get_per_token_logps_and_entropies


def patch_trl_log_probs(target=GRPOTrainer):
    """Route a TRL trainer's old and reference log-probs through the fused op (``fused_logps_method``):

        trainer = GRPOTrainer(...); patch_trl_log_probs(trainer)   # this trainer
        patch_trl_log_probs()                                      # every GRPOTrainer (a class: that class)

    ``target``: a trainer instance or class with TRL 1.16's ``_get_per_token_logps_and_entropies``. Patching twice
    does nothing. Returns ``target``."""
    current = target._get_per_token_logps_and_entropies
    if getattr(current, "dypo_fused", False):
        return target
    if isinstance(target, type):
        target._get_per_token_logps_and_entropies = fused_logps_method(current)
    else:
        target._get_per_token_logps_and_entropies = types.MethodType(
            fused_logps_method(type(target)._get_per_token_logps_and_entropies), target)
    return target


class DYPOTrainer(GRPOTrainer):
    def __init__(self, *args, alpha=0.5, gamma=1.0, beta_gal=1.0, switch_gate=0, teachers_field="target", **kwargs):
        super().__init__(*args, **kwargs)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)} with DYPOTrainer; got "
                             f"{self.loss_type!r}")
        batch_size = self.args.per_device_train_batch_size
        if batch_size % self.num_generations:
            raise ValueError(f"per_device_train_batch_size ({batch_size}) must be a multiple of num_generations "
                             f"({self.num_generations}): GAL needs whole groups in a batch")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must lie in [0, 1]; got {alpha}")
        for name, safe in UNSUPPORTED.items():
            if getattr(self.args, name, safe) != safe:
                reason = f": {WHY[name]}" if name in WHY else ""
                raise ValueError(f"DYPOTrainer does not support {name}={getattr(self.args, name)!r} (use {safe!r})"
                                 f"{reason}")
        check_importance_sampling_level(self.importance_sampling_level, self.loss_type)
        deepspeed = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_fsdp_enabled or (deepspeed is not None and deepspeed.zero_stage == 3):
            raise ValueError("DYPOTrainer reads lm_head.weight outside the forward: FSDP and DeepSpeed ZeRO-3 would "
                             "hand it a shard (use DDP or ZeRO-1/2, or python -m dypo.train under torchrun)")
        unwrapped = self.accelerator.unwrap_model(self.model)
        check_head(unwrapped, type(unwrapped).__name__, Runtime(next(unwrapped.parameters()).device))
        self.alpha, self.gamma, self.beta_gal, self.switch_gate = alpha, gamma, beta_gal, switch_gate
        self.teachers_field = teachers_field

    # TRL's old and reference log-probs (no grad) through the fused op; its own path elsewhere (fused_logps_method)
    _get_per_token_logps_and_entropies = fused_logps_method(GRPOTrainer._get_per_token_logps_and_entropies)

    # rewards and routing ----------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    def _teacher_ids(self, row, position):
        """A teacher solution of the row's prompt, drawn uniformly by a draw that depends only on the seed, the
        optimizer step, the process and the row's position: a resumed run draws what the uninterrupted one did,
        with no RNG state to checkpoint."""
        solutions = row.get(self.teachers_field)
        if isinstance(solutions, (str, dict)):
            solutions = [solutions]
        if not solutions:
            raise ValueError(f"DYPOTrainer: a hard prompt's row has no teacher solutions in {self.teachers_field!r}")
        draw = random.Random(f"{self.args.seed}:{self.state.global_step}:{self.accelerator.process_index}:{position}")
        text = draw.choice(solutions)
        text = text["content"] if isinstance(text, dict) else text
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return output
        k, rows = self.num_generations, output["completion_ids"].size(0)
        device = output["completion_ids"].device
        all_rewards = (self._rewards_per_func * self.reward_weights.to(device)).nansum(dim=1)
        start = self.accelerator.process_index * rows
        rewards = all_rewards[start:start + rows].float()
        all_grades = group_advantages(all_rewards.float().cpu(), group_size=k).grade  # every process's groups
        group_routes = routes_of(all_grades[start // k:(start + rows) // k],
                                 plain_grpo=self.state.global_step < self.switch_gate)
        route = group_routes.repeat_interleave(k)
        teacher_rows = {}
        for g, group_route in enumerate(group_routes.tolist()):
            if group_route == Route.SFT:  # a teacher solution over the group's first row, the others dropped
                route[g * k:(g + 1) * k] = int(Route.SKIP)
                route[g * k] = int(Route.SFT)
                teacher_rows[g * k] = self._teacher_ids(inputs[g * k], g * k)
        if teacher_rows:
            self._put_teacher_solutions(output, teacher_rows)
        output.update(route=route.to(device), rewards=rewards)
        for grade in (Grade.HARD, Grade.MID, Grade.EASY):
            self._metrics["train"][f"dypo/share_{grade.name.lower()}"].append(
                (all_grades == grade).float().mean().item())
        return output

    @staticmethod
    def _put_teacher_solutions(output, teacher_rows):
        """Write the teacher solutions over their rows' completions (widening the completion tensors if needed)."""
        width = max(output["completion_ids"].size(1), max(map(len, teacher_rows.values())))
        for name in COMPLETION_COLUMNS:
            if output.get(name) is not None and output[name].size(1) < width:
                output[name] = torch.nn.functional.pad(output[name], (0, width - output[name].size(1)))
        ratio = output.get(IS_RATIO)
        if ratio is not None and 1 < ratio.size(1) < width:  # a token-level ratio: 1 on the new columns
            output[IS_RATIO] = torch.nn.functional.pad(ratio, (0, width - ratio.size(1)), value=1.0)
        for row, ids in teacher_rows.items():
            output["completion_ids"][row] = 0
            output["completion_ids"][row, :len(ids)] = torch.tensor(ids)
            output["completion_mask"][row] = 0
            output["completion_mask"][row, :len(ids)] = 1

    def _prepare_inputs(self, generation_batch):
        """TRL's buffering, with the generation batch shuffled and split by whole groups."""
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        if self._step % (self.args.steps_per_generation * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            k, rows = self.num_generations, batch["completion_ids"].size(0)
            order = torch.randperm(rows // k).repeat_interleave(k) * k + torch.arange(rows) % k
            batch = {name: value[order] if isinstance(value, torch.Tensor) and value.dim() > 0 and
                     value.size(0) == rows else value for name, value in batch.items()}
            self._buffered_inputs = split_tensor_dict(batch, self.args.steps_per_generation)
            if self.loss_type in OVER_GENERATION:  # the loss types normalised by the generation batch
                self._generation_totals = BatchTotals.combine(gather_object([self._batch_totals(batch)]))
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _batch_totals(self, inputs):
        """dypo_loss's BatchTotals of a batch of whole groups, with dr_grpo's width TRL's max_completion_length (or
        the batch's width, where a teacher solution is longer)."""
        rows = inputs["completion_ids"].size(0)
        totals = batch_totals(mask=inputs["completion_mask"].bool(), route=inputs["route"], rewards=inputs["rewards"],
                              group_index=torch.arange(rows, device=inputs["route"].device) // self.num_generations)
        return totals._replace(max_length=max(totals.max_length, self.max_completion_length))

    # the loss ---------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        if not self.model.training:
            return super()._compute_loss(model, inputs)
        if "tool_mask" in inputs:
            raise ValueError("DYPOTrainer does not support tool masks (tool-output tokens would be trained)")
        inputs = _without_trailing_padding(inputs)  # a long teacher solution elsewhere widened every row
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1,
                    use_cache=False)
        hidden = out.hidden_states[-1][:, prompt_ids.size(1) - 1:-1]
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        rows = completion_ids.size(0)
        k = self.num_generations
        alpha = 1.0 if self.state.global_step < self.switch_gate else self.alpha
        # TRL divides each micro-batch's loss by the accumulation steps; its dapo instead divides the generation
        # batch's tokens among the processes and the accumulation windows it spans, which the generation batch's
        # totals, and this factor on its parts, reproduce (DDP averages the processes' gradients)
        if self.loss_type in OVER_GENERATION:
            totals = self._generation_totals
            scale = self.accelerator.num_processes * self.args.steps_per_generation / \
                self.current_gradient_accumulation_steps
        else:
            totals = self._batch_totals(inputs) if self.loss_type == "dr_grpo" else None
            scale = 1.0 / self.current_gradient_accumulation_steps
        loss, metrics = dypo_loss(
            hidden, head.weight.to(hidden.dtype), completion_ids, mask=inputs["completion_mask"].bool(),
            route=inputs["route"], rewards=inputs["rewards"],
            group_index=torch.arange(rows, device=hidden.device) // k, advantages=inputs["advantages"],
            old_logps=inputs.get("old_per_token_logps"), ref_logps=inputs.get("ref_per_token_logps"), alpha=alpha,
            gamma=self.gamma, beta_gal=self.beta_gal, beta_kl=self.beta, eps_low=self.epsilon_low,
            eps_high=self.epsilon_high, loss_type=self.loss_type,
            bias=None if getattr(head, "bias", None) is None else head.bias.to(hidden.dtype),
            temperature=self.temperature, use_bias_correction_kl=getattr(self.args, "use_bias_correction_kl", False),
            delta=getattr(self.args, "delta", None), importance_sampling_level=self.importance_sampling_level,
            vllm_is_ratio=inputs.get(IS_RATIO) if self.use_vllm and self.vllm_importance_sampling_correction else None,
            sapo_temperature_pos=getattr(self.args, "sapo_temperature_pos", 1.0),
            sapo_temperature_neg=getattr(self.args, "sapo_temperature_neg", 1.05), batch_totals=totals,
            return_metrics=True)
        self._log_loss_metrics(metrics)
        return loss * scale

    def _log_loss_metrics(self, metrics):
        """The loss terms and diagnostics of one micro-batch (dypo.metrics.WEIGHTS), read in one device-to-host
        copy. Under dapo a micro-batch's loss terms are its shares of the generation batch's: every process's
        shares are summed, so that the mean over the generation batch's micro-batches is the generation batch's
        term. Otherwise each micro-batch's own value on this process, where it covers some of the value's count
        (prompts for the loss terms, RL tokens for the token means, pairs for GAL's); TRL gathers its KL and clip
        metrics over the processes first, which this does not."""
        train = self._metrics["train"]
        (values,) = read_metrics([metrics])
        logged = dict(WEIGHTS)
        if self.loss_type in OVER_GENERATION:
            shares = torch.tensor([values[name] for name in LOSS_TERMS], device=self.accelerator.device)
            totals = self.accelerator.gather(shares).view(-1, len(LOSS_TERMS)).sum(0).tolist()
            for name, total in zip(LOSS_TERMS, totals):
                train[f"dypo/{name}"].append(total * self.args.steps_per_generation)
                del logged[name]
        for name, count in logged.items():
            if name in values and values.get(count, 0) > 0:
                train[f"dypo/{name}"].append(values[name])


def _without_trailing_padding(inputs):
    """The micro-batch with its completion columns past the last response token of any of its rows removed."""
    mask = inputs["completion_mask"]
    used = mask.any(0).nonzero()
    width = int(used.max()) + 1 if used.numel() else 1
    if width == mask.size(1):
        return inputs
    return {name: value[:, :width] if value is not None and (name in COMPLETION_COLUMNS or
                                                            name == IS_RATIO and value.size(1) > 1) else value
            for name, value in inputs.items()}
