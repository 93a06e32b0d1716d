"""The DYPO trainer, one step as the paper's Figure 2: rollouts -> grades -> routing -> updates.

k rollouts per prompt are scored (rewards, and the policy's log-probs for the RL terms' ratios); group_advantages
grades each prompt's group and gives its advantages; routing sends hard prompts' teacher solutions (one drawn
uniformly, or all) to the SFT queue and mid groups' rollouts to the RL queue, and drops easy ones; whenever the
queues hold train_batch_size prompts, one update: a policy forward to hidden states, dypo_loss with lm_head.weight
(no logits), clip, optimizer step; with --hard_loss kl or sft_kl, plus the hard rows' divergence toward the
teachers (teachers.py). Strategies for comparison: dypo (default), grpo, sft, sft_then_rl, sft_rl (routing.py),
and luffy (a teacher trajectory in each RL group, its own off-policy term). Under torchrun the same run is sharded
with FSDP2 (distributed.py)."""

import copy
import dataclasses
import math
import random
import re
import resource
import time
import warnings
from typing import List

import torch

from dypo import distributed, policy, teachers
from dypo.batches import completion_logprobs, loss_batch
from dypo.config import Config
from dypo.data import Problem, ProblemSource
from dypo.metrics import MERGE, TRAINER_LOSS_TERMS, merge_metrics, read_metrics
from dypo.rewards import load_reward, score
from dypo.routing import Queues, Row, offline_share, route_groups
from dypo.vllm_engine import prepare_vllm, start_vllm
from dypo_kernels import BatchTotals, Grade, Route, batch_totals, dypo_loss, fused_linear_logprobs, group_advantages


@dataclasses.dataclass
class Rollouts:
    """One step's prompts (every rank's) and this rank's block of them: ``group_size`` rows per prompt (prompt +
    completion, reward, the policy's log-probs), the completions' texts and the policy's mean entropy over them."""

    problems: List[Problem]
    first: int
    group_size: int
    rows: List[Row]
    texts: List[str]
    entropy: float

    @property
    def mine(self):
        return self.problems[self.first:self.first + len(self.rows) // self.group_size]


class Trainer:
    def __init__(self, config: Config, problems=None, reward_function=None, world=None):
        self.config, self.world = config, world or distributed.World()
        self.reward_function = reward_function or load_reward(config.reward)
        torch.manual_seed(config.seed)
        self.rng = random.Random(config.seed)  # data order and teacher choices: the same on every rank
        # under torchrun the policy and its reference stay in host memory until sharded: fully_shard moves one
        # layer at a time to the GPU, which never holds either whole before training
        self.model, self.codec, self.runtime = policy.load_policy(config, self.world.device,
                                                                  on_device=not self.world.distributed)
        self.model.eval()  # no dropout, in rollouts and updates alike (TRL's disable_dropout): ratios start at 1
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.policy = policy.FusedHead(self.model, self.runtime)
        self.reference_head = policy.FusedHead(self.reference, self.runtime)
        # the teachers stay outside the policy: never trained, never in a checkpoint (a resumed run loads them again)
        self.hard_kl = None
        if config.hard_loss != "sft":
            models = teachers.load_teachers(config, self.model, self.runtime,
                                            say=print if self.world.main else lambda line: None) \
                if config.teacher_models else None
            self.hard_kl = teachers.HardKL(config, self.runtime, models)
        vllm_model = prepare_vllm(config, self.model, self.runtime) if config.use_vllm else None
        if self.world.distributed:
            distributed.shard(self.policy, self.model, self.world.device)
            distributed.shard(self.reference_head, self.reference, self.world.device)
        self.engine = start_vllm(config, vllm_model, self.codec, self.runtime, self.world) \
            if vllm_model is not None else None
        if self.world.distributed:
            torch.manual_seed(config.seed + 1 + self.world.rank)  # each rank samples its own rollouts
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(config))
        self.source = ProblemSource(config, self.rng, problems)
        self.queues = Queues()
        self.step = 0
        self.updates = 0

    @property
    def needs_reference(self):
        return self.config.beta > 0 or self.config.strategy == "dypo" and self.config.alpha < 1  # KL and GAL

    def train_step(self, step):
        """One step: rollouts of prompts_per_step prompts, their grades, their routing to the queues, then every
        update the queues can fill (under torchrun each rank rolls out its block of the prompts, the queues hold
        every rank's groups, and each rank trains on its block of a batch). Returns the metrics merged over ranks,
        and sample completions."""
        started = time.monotonic()
        if self.world.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rollouts = self.rollouts(self.source.next(self.config.prompts_per_step))
        rewards, graded = self.grade(rollouts)
        routes, alpha = route_groups(graded.grade, self.config.strategy, step, self.config)
        self.enqueue(rollouts, graded, routes, step)
        updates = self.train_on_queues(alpha)
        seconds = time.monotonic() - started
        metrics = {"step": step, **rollout_metrics(rollouts, rewards, graded, routes, self.config.strategy),
                   "updates": len(updates),
                   "queued_prompts": len(self.queues), **merge_metrics(updates)}
        metrics.update({"step_seconds": seconds,
                        "tokens_per_second": (metrics["rollout_tokens"] + metrics.get("train_tokens", 0)) / seconds,
                        "peak_memory_mb": peak_memory_mb(self.world.device)})
        samples = [{"step": step, "prompt": problem.prompt, "completion": rollouts.texts[g * rollouts.group_size],
                    "reward": rollouts.rows[g * rollouts.group_size].reward, "answer": problem.answer}
                   for g, problem in enumerate(rollouts.mine)][:self.config.num_samples]
        return self.world.combine(metrics), samples

    # rollouts -> grades -> routing ----------------------------------------------------------------------------
    def rollouts(self, problems):
        """k completions of each prompt of this rank's contiguous block of ``problems``, their rewards, and the
        policy's log-probs of them (the old log-probs of the RL terms) and mean entropy."""
        config, codec, k = self.config, self.codec, self.config.num_generations
        local = len(problems) // self.world.size
        first = self.world.rank * local
        mine = problems[first:first + local]
        prompt_ids = [codec.prompt_ids(p.prompt) for p in mine]
        completions = self.completions([ids for ids in prompt_ids for _ in range(k)], temperature=config.temperature)
        texts = [codec.text(c) for c in completions]
        rewards = score(self.reward_function, [p.prompt for p in mine for _ in range(k)], texts,
                        [p.answer for p in mine for _ in range(k)])
        rows = [Row(prompt_ids[i // k] + c, len(prompt_ids[i // k]), rewards[i]) for i, c in enumerate(completions)]
        old_logps, entropy = completion_logprobs(self.policy, rows, codec.pad_id, self.world.device,
                                                 config.temperature, entropy=True,
                                                 batch_size=config.log_prob_micro_batch_size)
        for row, logps in zip(rows, old_logps):
            row.old_logps = logps
        return Rollouts(problems, first, k, rows, texts, entropy)

    def grade(self, rollouts):
        """Every rank's rewards (in rank order: the step's prompts in order), and each group's advantages and
        grade from them (group_advantages)."""
        rewards = self.world.all_gather(torch.tensor([row.reward for row in rollouts.rows],
                                                     device=self.world.collective_device)).cpu()
        return rewards, group_advantages(rewards, group_size=rollouts.group_size, scale=self.config.scale_rewards)

    def enqueue(self, rollouts, graded, routes, step):
        """Each routed group into its queue: an RL group's rollouts with their advantages (and the reference's
        log-probs), an SFT group's teacher solutions, one drawn uniformly or all; SKIP groups are dropped. Every
        rank draws every teacher choice, and the queues get every rank's groups, in rank order."""
        config, k, first, rows = self.config, rollouts.group_size, rollouts.first, rollouts.rows
        if self.needs_reference and Route.RL in routes:
            ref_logps = completion_logprobs(self.reference_head, rows, self.codec.pad_id, self.world.device,
                                            config.temperature, batch_size=config.log_prob_micro_batch_size)
            for row, logps in zip(rows, ref_logps):
                row.ref_logps = logps
        advantages = graded.advantages.tolist()
        strategy, routed_here, mixed = config.strategy, [], []
        for g, (problem, route) in enumerate(zip(rollouts.problems, routes)):
            drawn = range(min(len(problem.teacher_solutions), config.num_teachers or len(problem.teacher_solutions)))
            taught = route == Route.SFT or route == Route.RL and strategy in ("luffy", "sft_rl")
            if taught and (config.sft_teachers == "one" or strategy == "luffy"):
                drawn = [self.rng.choice(drawn)]
            if not first <= g < first + len(rows) // k:
                continue
            own = rows[(g - first) * k:(g - first + 1) * k]
            prompt = own[0].ids[:own[0].prompt_length]
            solutions = [Row(prompt + self.codec.solution_ids(problem.teacher_solutions[j]), len(prompt),
                             teacher_topk=None if problem.teacher_topk is None else problem.teacher_topk[j])
                         for j in drawn] if taught else []
            if route == Route.RL and strategy == "luffy":
                mixed.append((problem, own, solutions[0]))
            elif route == Route.RL:
                for j, row in enumerate(own):
                    row.advantage = advantages[g * k + j]
                if strategy == "sft_rl":
                    routed_here.append((Route.SFT, solutions))
                routed_here.append((Route.RL, own))
            elif route == Route.SFT:
                routed_here.append((Route.SFT, solutions))
        routed_here += [(Route.RL, group) for group in self.mixed_groups(mixed)]  # luffy routes nothing else
        for route, group_rows in self.world.gather_objects(routed_here):
            self.queues.push(step, route, group_rows)

    def mixed_groups(self, groups):
        """LUFFY's mixed-policy groups from (problem, its rollouts, a teacher row): the last rollout in the teacher
        trajectory's place, the trajectories scored by the reward function in one call, and the advantages over
        the mixed groups in one group_advantages call (scale_rewards "batch": over the step's mixed groups)."""
        if not groups:
            return []
        rewards = score(self.reward_function, [problem.prompt for problem, _, _ in groups],
                        [self.codec.text(teacher.ids[teacher.prompt_length:]) for _, _, teacher in groups],
                        [problem.answer for problem, _, _ in groups])
        mixed = []
        for (_, own, teacher), reward in zip(groups, rewards):
            teacher.reward, teacher.off_policy = reward, True
            mixed.append(own[:-1] + [teacher])
        rows = [row for group in mixed for row in group]
        advantages = group_advantages(torch.tensor([row.reward for row in rows]), group_size=len(mixed[0]),
                                      scale=self.config.scale_rewards).advantages.tolist()
        for row, advantage in zip(rows, advantages):
            row.advantage = advantage
        return mixed

    # updates --------------------------------------------------------------------------------------------------
    def train_on_queues(self, alpha):
        """Every update the queues can fill, each on the oldest train_batch_size prompts (this rank's block of
        them); then the learning-rate schedule's step. Returns each update's metrics."""
        updates, share, rank = [], self.config.train_batch_size // self.world.size, self.world.rank
        while len(self.queues) >= self.config.train_batch_size:
            batch = self.queues.pop_batch(self.config.train_batch_size)
            updates.append(self.update(batch[rank * share:(rank + 1) * share], alpha))
        with warnings.catch_warnings():  # a step without an update (every prompt easy) still advances the schedule
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()
        return updates

    def update(self, groups, alpha):
        """One optimizer step on a batch of routed groups: dypo_loss, clip, step. With ``micro_batch_size`` the
        batch goes through forward and backward that many prompts at a time. When the update is split
        (micro-batches, ranks), every part is normalised by the whole update's BatchTotals, so the parts add up to
        the whole update's loss and gradient for every loss_type. Its metrics are read in one device-to-host copy."""
        size = self.config.micro_batch_size or len(groups)
        batches = [self.batch(groups[start:start + size]) for start in range(0, len(groups), size)]
        split = len(batches) > 1 or self.world.distributed
        totals = None
        if split:
            mine = BatchTotals.combine([batch_totals(mask=b["mask"], route=b["route"], rewards=b["rewards"],
                                                     group_index=b["group_index"]) for b in batches])
            totals = BatchTotals.combine(self.world.gather_objects([mine]))
        self.optimizer.zero_grad(set_to_none=True)
        parts = []
        for batch in batches:
            loss, metrics = self.loss(batch, alpha, totals)
            # each rank's loss is its share of the whole update's; FSDP averages the ranks' gradients
            (loss * self.world.size if self.world.distributed else loss).backward()
            parts.append({"loss": loss.detach(), **metrics})
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.updates += 1
        *parts, norm = read_metrics([*parts, {"grad_norm": grad_norm}])
        loss = sum(part.pop("loss") for part in parts)
        loss_metrics = merge_metrics(parts)
        if split:  # each part holds its share of the whole update's loss terms: their sums are the update's
            shares = {name: sum(part.get(name, 0.0) for part in parts) for name in TRAINER_LOSS_TERMS
                      if any(name in part for part in parts)}  # hard_kl: only where a part has hard rows
            shares["loss"] = loss
            everyone = self.world.gather_objects([shares])
            whole = {name: sum(rank.get(name, 0.0) for rank in everyone) for name in TRAINER_LOSS_TERMS + ("loss",)
                     if any(name in rank for rank in everyone)}
            loss = whole.pop("loss")
            loss_metrics.update(whole)
        return {"loss": loss, "grad_norm": norm["grad_norm"], "learning_rate": self.scheduler.get_last_lr()[0],
                "train_tokens": sum(len(row.ids) - row.prompt_length for group in groups for row in group.rows),
                **{name: value for name, value in loss_metrics.items() if name in MERGE}}

    def batch(self, groups):
        """loss_batch's tensors of routed groups, and with --hard_loss kl or sft_kl the teachers' side of their hard
        rows (``hard``: None when there are none)."""
        batch = loss_batch(groups, self.codec.pad_id, self.world.device)
        if self.hard_kl is not None:
            batch["hard"] = self.hard_kl.inputs(groups, self.codec.pad_id, self.world.device)
        return batch

    def loss(self, batch, alpha, totals=None):
        """dypo_loss on a batch (Trainer.batch's tensors) after one forward of the policy to hidden states,
        normalised over the whole update's ``totals`` when the batch is a part of it: (loss, metrics). With
        --hard_loss kl or sft_kl the hard prompts' term is gamma L_SFT (sft_kl only) + kl_coef L_KL, L_KL the token
        mean of the divergence over their solution tokens, weighted by the hard share of the update's prompts as
        dypo_loss weighs L_SFT; metric ``hard_kl``: L_KL (this part's share of it with ``totals``), where the batch
        has hard rows."""
        config = self.config

        def objective(hidden, weight, bias):
            loss, metrics = dypo_loss(
                hidden, weight, batch["targets"], mask=batch["mask"], route=batch["route"], rewards=batch["rewards"],
                group_index=batch["group_index"], advantages=batch["advantages"], old_logps=batch["old_logps"],
                ref_logps=batch["ref_logps"], alpha=alpha, gamma=0.0 if config.hard_loss == "kl" else config.gamma,
                beta_gal=config.beta_gal, beta_kl=config.beta, eps_low=config.epsilon, eps_high=config.epsilon_high,
                loss_type=config.loss_type, bias=bias, temperature=config.temperature,
                use_bias_correction_kl=config.use_bias_correction_kl, entropy_coef=config.entropy_coef,
                delta=config.delta or None, importance_sampling_level=config.importance_sampling_level,
                sapo_temperature_pos=config.sapo_temperature_pos, sapo_temperature_neg=config.sapo_temperature_neg,
                batch_totals=totals, return_metrics=True)
            if batch["off_policy"] is not None:
                loss = self.with_off_policy(loss, hidden, weight, bias, batch)
            if self.hard_kl is not None and batch["hard"] is not None:
                kl, tokens = self.hard_kl.loss(hidden, weight, bias, batch["hard"])
                prompts_sft, prompts_rl, tokens_sft = (totals.prompts_sft, totals.prompts_rl, totals.tokens_sft) \
                    if totals is not None else (metrics["num_prompts_sft"], metrics["num_prompts_rl"], tokens)
                kl = kl * (tokens / max(tokens_sft, 1))  # this part's share of the update's token mean
                metrics["hard_kl"] = kl.detach()
                loss = loss + config.kl_coef * prompts_sft / max(prompts_sft + prompts_rl, 1) * kl
            return loss, metrics

        return self.policy(batch["ids"], batch["attention"], objective)

    def with_off_policy(self, loss, hidden, weight, bias, batch):
        """Strategy luffy: the on-policy GRPO loss (dypo_loss on the RL rows, alpha 1) joined by LUFFY's
        off-policy term on the teacher trajectories, -A f(p_t) with the policy shaping f(p) = p / (p + gamma)
        (no ratio, no clip: Yan et al. 2025, arXiv 2504.14945, section 3.3), each term aggregated over both kinds of
        row as loss_type says: grpo, the mean over rows of each row's token mean; dapo, the token mean. Token
        log-probs of the trajectories with gradients: fused_linear_logprobs."""
        config, rows, mask = self.config, batch["off_policy"], batch["mask"]
        off_mask = mask.index_select(0, rows)
        targets = batch["targets"].index_select(0, rows).masked_fill(~off_mask, -100)
        logps = fused_linear_logprobs(hidden.index_select(0, rows), weight, targets, bias=bias,
                                      temperature=config.temperature)
        shaped = torch.sigmoid(logps.float() - math.log(config.luffy_gamma))  # p / (p + gamma)
        terms = -batch["advantages"].index_select(0, rows)[:, None] * shaped * off_mask
        on_policy = batch["route"] == Route.RL
        if config.loss_type == "grpo":
            count_on, count_off = on_policy.sum(), rows.numel()
            off = (terms.sum(1) / off_mask.sum(1).clamp(min=1)).sum()
        else:
            count_on, count_off = mask[on_policy].sum(), off_mask.sum()
            off = terms.sum()
        return (loss * count_on + off) / (count_on + count_off)

    # evaluation and state -------------------------------------------------------------------------------------
    def evaluate(self, problems):
        """Share of greedy completions whose reward exceeds 0.5 (each rank decodes every size-th prompt)."""
        mine = problems[self.world.rank::self.world.size]
        correct = 0.0
        completions = self.completions([self.codec.prompt_ids(p.prompt) for p in mine], temperature=1.0, greedy=True)
        if mine:
            texts = [self.codec.text(c) for c in completions]
            rewards = score(self.reward_function, [p.prompt for p in mine], texts, [p.answer for p in mine])
            correct = float(sum(r > 0.5 for r in rewards))
        return self.world.total(correct) / len(problems)

    def completions(self, prompt_ids, *, temperature, greedy=False):
        """Completions of the prompts from the current policy, by vLLM (``--use_vllm``) or the model's generate.
        Every rank calls this, with or without prompts: the weights are gathered collectively."""
        config = self.config
        if self.engine is not None:
            self.engine.sync(self.model, self.updates)
            return self.engine.generate(prompt_ids, max_new_tokens=config.max_new_tokens, temperature=temperature,
                                        greedy=greedy) if prompt_ids else []
        with distributed.gathered(self.policy, self.world):
            return policy.generate(self.model, self.codec, self.runtime, prompt_ids,
                                   max_new_tokens=config.max_new_tokens, temperature=temperature, greedy=greedy,
                                   batch_size=config.generation_batch_size) if prompt_ids else []

    def full_state_dict(self):
        """The policy's whole state dict on CPU (under torchrun every rank takes part in gathering it)."""
        if not self.world.distributed:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {name.removeprefix("model."): tensor for name, tensor in state.items()}

    def state(self, extra):
        version, internal, gauss = self.rng.getstate()
        return {"step": self.step, "updates": self.updates, "python_rng": [version, list(internal), gauss],
                "queues": self.queues.state(), "source": self.source.state(), **extra}

    def load_state(self, state):
        self.step, self.updates = state["step"], state["updates"]
        version, internal, gauss = state["python_rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.queues = Queues.from_state(state["queues"])
        self.source.load_state(state["source"])


def rollout_metrics(rollouts, rewards, graded, routes, strategy):
    """The step's rewards, grade shares (of the policy's own rollouts), offline ratio (the mean off-policy share of
    the routed prompts' data, routing.offline_share), entropy and rollout tokens."""
    routed = [offline_share(route, strategy, rollouts.group_size) for route in routes if route != Route.SKIP]
    return {"reward_mean": rewards.mean().item(),
            **{f"share_{grade.name.lower()}": (graded.grade == grade).float().mean().item() for grade in Grade},
            "offline_ratio": sum(routed) / len(routed) if routed else 0.0,
            "entropy": rollouts.entropy,
            "rollout_tokens": sum(len(row.ids) - row.prompt_length for row in rollouts.rows)}


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (Linux: KiB)


def lr_schedule(config):
    warmup = int(config.warmup_ratio * config.max_steps)

    def factor(step):
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / max(1, config.max_steps - warmup)
        if config.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        if config.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor
