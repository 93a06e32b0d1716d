"""python -m dypo.train: DYPO end to end. With no arguments: a tiny Qwen2 model built from a config, a character
tokenizer and built-in multi-digit additions with two rule-based teachers, on a CPU in about a minute. With
--model and --data: a local Hugging Face causal LM on a JSONL or Parquet file of prompts, answers and teacher
solutions (nothing is downloaded).

Each step: k rollouts per prompt -> rewards -> group_advantages (advantages and grades) -> routing (hard: SFT on a
teacher solution drawn uniformly, or on all of them; mid: alpha GRPO + (1 - alpha) GAL on the rollouts; easy:
dropped) -> the SFT and RL queues; whenever they hold train_batch_size prompts: one policy forward to hidden states
-> dypo_loss with lm_head.weight (no logits) -> clip -> optimizer step. Old and reference log-probs come from the
fused forward at rollout time. Strategies for comparison: dypo (default), grpo, sft, sft_then_rl. The run
directory gets config.json, metrics.jsonl, samples.jsonl, PNG plots, summary.json and checkpoints (--resume
RUN_DIR continues from the last one). Under torchrun the same run is sharded with FSDP2 (dypo/distributed.py).
"""

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional

import torch

from dypo import checkpoint, distributed, plots, policy, task
from dypo.config import Config, parse_config
from dypo.data import DataError, load_problems
from dypo.rewards import RewardError, load_reward, score
from dypo.vllm_engine import prepare_vllm, start_vllm
from dypo_kernels import BatchTotals, Grade, Route, batch_totals, dypo_loss, fused_linear_logprobs, \
    group_advantages

SUMMED_LOSS_TERMS = ("loss_sft", "loss_grpo", "loss_gal")  # with batch_totals, each part holds its share
UPDATE_METRICS = ("loss", "loss_sft", "loss_grpo", "loss_gal", "clip_fraction_low", "clip_fraction_high",
                  "mean_ratio", "mean_kl", "pair_accuracy", "num_pairs", "num_prompts_sft", "num_prompts_rl",
                  "num_tokens_rl", "grad_norm", "learning_rate", "train_tokens")


@dataclasses.dataclass
class Row:
    """One training sequence: prompt + completion token ids; RL rows carry their rollout-time log-probs (one per
    completion token) and advantage."""

    ids: List[int]
    prompt_length: int
    reward: float = 0.0
    advantage: float = 0.0
    old_logps: Optional[List[float]] = None
    ref_logps: Optional[List[float]] = None


@dataclasses.dataclass
class RoutedGroup:
    """One prompt's rows waiting in a queue."""

    arrival: int
    step: int
    route: int
    rows: List[Row]


class Queues:
    """The SFT queue (hard prompts' teacher solutions) and the RL queue (mid groups' rollouts). An update fires
    whenever together they hold a batch; it takes the oldest prompts of both."""

    def __init__(self):
        self.groups = {Route.SFT: [], Route.RL: []}
        self.arrivals = 0

    def push(self, step, route, rows):
        self.groups[route].append(RoutedGroup(self.arrivals, step, int(route), rows))
        self.arrivals += 1

    def __len__(self):
        return sum(map(len, self.groups.values()))

    def pop_batch(self, size):
        batch = sorted(self.groups[Route.SFT] + self.groups[Route.RL], key=lambda g: g.arrival)[:size]
        taken = {g.arrival for g in batch}
        for route in self.groups:
            self.groups[route] = [g for g in self.groups[route] if g.arrival not in taken]
        return batch

    def state(self):
        return {"arrivals": self.arrivals,
                "groups": [dataclasses.asdict(g) for route in self.groups for g in self.groups[route]]}

    @classmethod
    def from_state(cls, state):
        queues = cls()
        queues.arrivals = state["arrivals"]
        for group in state["groups"]:
            queues.groups[Route(group["route"])].append(
                RoutedGroup(group["arrival"], group["step"], group["route"], [Row(**row) for row in group["rows"]]))
        return queues


class ProblemSource:
    """The training prompts of each step: drawn from the built-in task, or a data file in shuffled epochs."""

    def __init__(self, config, rng, problems=None):
        self.config, self.rng, self.problems = config, rng, problems
        self.order, self.position = [], 0

    def next(self, count):
        if self.problems is None:
            return task.make_problems(self.rng, count, self.config.max_digits)
        batch = []
        while len(batch) < count:
            if self.position == len(self.order):
                self.order = list(range(len(self.problems)))
                self.rng.shuffle(self.order)
                self.position = 0
            batch.append(self.problems[self.order[self.position]])
            self.position += 1
        return batch

    def state(self):
        return {"order": self.order, "position": self.position}

    def load_state(self, state):
        self.order, self.position = state["order"], state["position"]


def load_data(config):
    """(training problems or None for the built-in task, evaluation problems)."""
    if not config.data:
        return None, task.make_problems(random.Random(config.seed + 1), config.eval_prompts, config.max_digits)
    fields = {"prompt_field": config.prompt_field, "answer_field": config.answer_field,
              "teachers_field": config.teachers_field}
    problems = load_problems(config.data, **fields)
    if config.eval_data:
        return problems, load_problems(config.eval_data, option="--eval_data", **fields)[:config.eval_prompts]
    if len(problems) <= config.eval_prompts:
        raise DataError(f"--data {config.data}: {len(problems)} records leave none for training after holding out "
                        f"eval_prompts={config.eval_prompts}; lower --eval_prompts or give --eval_data")
    order = list(range(len(problems)))
    random.Random(config.seed + 1).shuffle(order)
    held_out = set(order[:config.eval_prompts])
    training = [p for i, p in enumerate(problems) if i not in held_out]
    return training, [problems[i] for i in order[:config.eval_prompts]]


def padded_batch(rows, pad_id, device):
    """Right-padded ids and attention mask [B, L]; targets (next tokens, 0 where unused) and the completion mask
    [B, L - 1]."""
    width = max(len(row.ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row.ids)] = torch.tensor(row.ids)
        attention[i, :len(row.ids)] = 1
        mask[i, row.prompt_length - 1:len(row.ids) - 1] = True  # positions predicting the completion tokens
    targets = ids[:, 1:].masked_fill(~mask, 0)
    return ids.to(device), attention.to(device), targets.to(device), mask.to(device)


@torch.no_grad()
def completion_logprobs(head, rows, pad_id, device, temperature, entropy=False, batch_size=0):
    """Per-row log-probs of the completion tokens (lists) from a FusedHead (hidden states and the fused op, no
    logits), ``batch_size`` rows per forward (0: all at once); with ``entropy`` also the mean policy entropy over
    those tokens."""
    per_row, entropy_sum, tokens = [], 0.0, 0
    size = batch_size or len(rows)
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        ids, attention, targets, mask = padded_batch(chunk, pad_id, device)
        result = head(ids, attention, lambda hidden, weight, bias: fused_linear_logprobs(
            hidden, weight, targets.masked_fill(~mask, -100), bias=bias, temperature=temperature,
            return_entropy=entropy))
        distributed.reshard(head)  # under FSDP2 a forward without backward leaves the root gathered
        logps, token_entropy = result if entropy else (result, None)
        logps, kept = logps.float().cpu(), mask.cpu()  # one transfer, not one per row
        per_row += [logps[i][kept[i]].tolist() for i in range(len(chunk))]
        if entropy:
            entropy_sum += token_entropy.float()[mask].sum().item()
            tokens += int(mask.sum())
    if not entropy:
        return per_row
    return per_row, entropy_sum / max(tokens, 1)


def plain_rl(strategy, step, config):
    """Whether this step trains plain GRPO: the grpo strategy, DYPO before switch_gate, sft_then_rl's second half."""
    return strategy == "grpo" or (strategy == "dypo" and step < config.switch_gate) or \
        (strategy == "sft_then_rl" and step >= config.max_steps // 2)


def route_groups(grades, strategy, step, config):
    """The Route of each prompt's group from its Grade: what DYPO does, or the comparison strategies; and the
    alpha of the RL term (1: plain GRPO)."""
    plain = plain_rl(strategy, step, config)
    routes = []
    for grade in grades:
        if strategy == "sft" or (strategy == "sft_then_rl" and not plain):
            routes.append(Route.SFT)
        elif grade == Grade.EASY:
            routes.append(Route.SKIP)
        elif grade == Grade.HARD and not plain:
            routes.append(Route.SFT)
        else:
            routes.append(Route.RL)
    return routes, (1.0 if plain else config.alpha)


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
        vllm_model = prepare_vllm(config, self.model, self.runtime) if config.use_vllm == "true" else None
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

    # rollouts -------------------------------------------------------------------------------------------------
    def rollout(self, problems, step):
        """Rollouts, rewards, grades and routing of one step's prompts (this rank's contiguous block of them);
        routed groups go to the queues. Returns the step's metrics and samples."""
        config, codec, k, world = self.config, self.codec, self.config.num_generations, self.world
        local = len(problems) // world.size
        first = world.rank * local
        mine = problems[first:first + local]
        prompt_ids = [codec.prompt_ids(p.prompt) for p in mine]
        completions = self.completions([ids for ids in prompt_ids for _ in range(k)], temperature=config.temperature)
        texts = [codec.text(c) for c in completions]
        rewards = score(self.reward_function, [p.prompt for p in mine for _ in range(k)], texts,
                        [p.answer for p in mine for _ in range(k)])
        all_rewards = world.all_gather(torch.tensor(rewards, device=world.collective_device)).cpu()
        graded = group_advantages(all_rewards, group_size=k, scale=config.scale_rewards)
        routes, _ = route_groups(graded.grade.tolist(), config.strategy, step, config)
        rows = [Row(prompt_ids[i // k] + c, len(prompt_ids[i // k]), rewards[i],
                    graded.advantages[first * k + i].item()) for i, c in enumerate(completions)]
        old_logps, entropy = completion_logprobs(self.policy, rows, codec.pad_id, world.device, config.temperature,
                                                 entropy=True, batch_size=config.log_prob_micro_batch_size)
        ref_logps = completion_logprobs(self.reference_head, rows, codec.pad_id, world.device, config.temperature,
                                        batch_size=config.log_prob_micro_batch_size) \
            if self.needs_reference and Route.RL in routes else [None] * len(rows)
        routed_here = []
        for g, (problem, route) in enumerate(zip(problems, routes)):  # every rank draws every teacher choice
            solutions = problem.teacher_solutions if config.sft_teachers == "all" or route != Route.SFT else \
                [self.rng.choice(problem.teacher_solutions)]
            if not first <= g < first + local:
                continue
            own = range((g - first) * k, (g - first + 1) * k)
            if route == Route.RL:
                for i in own:
                    rows[i].old_logps, rows[i].ref_logps = old_logps[i], ref_logps[i]
                routed_here.append((Route.RL, [rows[i] for i in own]))
            elif route == Route.SFT:
                ids = prompt_ids[g - first]
                routed_here.append((Route.SFT, [Row(ids + codec.solution_ids(text), len(ids)) for text in solutions]))
        for route, group_rows in world.gather_objects(routed_here):  # one queue, the same on every rank
            self.queues.push(step, route, group_rows)
        routed = [r for r in routes if r != Route.SKIP]
        metrics = {"reward_mean": all_rewards.mean().item(),
                   **{f"share_{grade.name.lower()}": (graded.grade == grade).float().mean().item() for grade in Grade},
                   "offline_ratio": sum(r == Route.SFT for r in routed) / len(routed) if routed else 0.0,
                   "entropy": entropy, "rollout_tokens": sum(map(len, completions))}
        samples = [{"step": step, "prompt": mine[i // k].prompt, "completion": texts[i], "reward": rewards[i],
                    "answer": mine[i // k].answer} for i in range(0, len(texts), max(1, k))][:config.num_samples]
        return metrics, samples

    # update ---------------------------------------------------------------------------------------------------
    def batch(self, groups):
        """The padded tensors of a batch of routed groups, as dypo_loss takes them (ids, attention for the
        forward)."""
        rows = [row for group in groups for row in group.rows]
        ids, attention, targets, mask = padded_batch(rows, self.codec.pad_id, self.world.device)
        kept = mask.cpu()

        def logps_of(name):
            if not any(getattr(row, name) for row in rows):
                return None
            values = torch.zeros(kept.shape)  # filled on the host, moved once
            for i, row in enumerate(rows):
                if getattr(row, name):
                    values[i, kept[i]] = torch.tensor(getattr(row, name))
            return values.to(ids.device)

        return dict(ids=ids, attention=attention, targets=targets, mask=mask,
                    route=torch.tensor([group.route for group in groups for _ in group.rows], device=ids.device),
                    group_index=torch.tensor([g for g, group in enumerate(groups) for _ in group.rows],
                                             device=ids.device),
                    rewards=torch.tensor([row.reward for row in rows], device=ids.device),
                    advantages=torch.tensor([row.advantage for row in rows], device=ids.device),
                    old_logps=logps_of("old_logps"), ref_logps=logps_of("ref_logps"))

    def loss(self, batch, alpha, totals=None):
        """dypo_loss on a batch (``batch``'s tensors) after one forward of the policy to hidden states, normalised
        over the whole update's ``totals`` when the batch is a part of it: (loss, metrics, trained tokens)."""
        config = self.config
        loss, metrics = self.policy(batch["ids"], batch["attention"], lambda hidden, weight, bias: dypo_loss(
            hidden, weight, batch["targets"], mask=batch["mask"], route=batch["route"], rewards=batch["rewards"],
            group_index=batch["group_index"], advantages=batch["advantages"], old_logps=batch["old_logps"],
            ref_logps=batch["ref_logps"], alpha=alpha, gamma=config.gamma, beta_gal=config.beta_gal,
            beta_kl=config.beta, eps_low=config.epsilon, eps_high=config.epsilon_high, loss_type=config.loss_type,
            bias=bias, temperature=config.temperature, use_bias_correction_kl=config.use_bias_correction_kl == "true",
            batch_totals=totals, return_metrics=True))
        return loss, metrics, int(batch["mask"].sum())

    def update(self, groups, step):
        """One optimizer step on a batch of routed groups (this rank's block of the update): dypo_loss, clip, step.
        With ``micro_batch_size`` the batch goes through forward and backward that many prompts at a time. When
        the update is split (micro-batches, ranks), every part is normalised by the whole update's BatchTotals, so
        the parts add up to the whole update's loss and gradient for every loss_type."""
        alpha = 1.0 if plain_rl(self.config.strategy, step, self.config) else self.config.alpha
        size = self.config.micro_batch_size or len(groups)
        batches = [self.batch(groups[start:start + size]) for start in range(0, len(groups), size)]
        split = len(batches) > 1 or self.world.distributed
        totals = None
        if split:
            mine = BatchTotals.combine([batch_totals(mask=b["mask"], route=b["route"], rewards=b["rewards"],
                                                     group_index=b["group_index"]) for b in batches])
            totals = BatchTotals.combine(self.world.gather_objects([mine]))
        self.optimizer.zero_grad(set_to_none=True)
        loss, tokens, parts = 0.0, 0, []
        for batch in batches:
            micro_loss, micro_metrics, micro_tokens = self.loss(batch, alpha, totals)
            # each rank's loss is its share of the whole update's; FSDP averages the ranks' gradients
            (micro_loss * self.world.size if self.world.distributed else micro_loss).backward()
            loss, tokens = loss + micro_loss.item(), tokens + micro_tokens
            parts.append({name: float(value) for name, value in micro_metrics.items()})
        loss_metrics = distributed.merge_metrics(parts)
        if split:  # each part holds its share of the whole update's loss terms: their sums are the update's
            shares = {name: sum(part.get(name, 0.0) for part in parts) for name in SUMMED_LOSS_TERMS}
            shares["loss"] = loss
            everyone = self.world.gather_objects([shares])
            whole = {name: sum(rank[name] for rank in everyone) for name in shares}
            loss = whole.pop("loss")
            loss_metrics.update(whole)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.updates += 1
        return {"loss": loss, "grad_norm": grad_norm.item(), "learning_rate": self.scheduler.get_last_lr()[0],
                "train_tokens": tokens,
                **{name: float(value) for name, value in loss_metrics.items() if name in UPDATE_METRICS}}

    def train_step(self, step):
        """One step: rollouts of prompts_per_step prompts, then every update the queues can fill (under torchrun the
        queues hold every rank's groups, and each rank trains on its block of the batch). Returns the metrics
        merged over ranks."""
        started = time.monotonic()
        if self.world.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        metrics, samples = self.rollout(self.source.next(self.config.prompts_per_step), step)
        updates, share, rank = [], self.config.train_batch_size // self.world.size, self.world.rank
        while len(self.queues) >= self.config.train_batch_size:
            batch = self.queues.pop_batch(self.config.train_batch_size)
            updates.append(self.update(batch[rank * share:(rank + 1) * share], step))
        with warnings.catch_warnings():  # a step without an update (every prompt easy) still advances the schedule
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()
        seconds = time.monotonic() - started
        metrics = {"step": step, **metrics, "updates": len(updates), "queued_prompts": len(self.queues),
                   **distributed.merge_metrics(updates)}
        metrics.update({"step_seconds": seconds,
                        "tokens_per_second": (metrics["rollout_tokens"] + metrics.get("train_tokens", 0)) / seconds,
                        "peak_memory_mb": peak_memory_mb(self.world.device)})
        return self.world.combine(metrics), samples

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


def _kept_lines(path: Path, before_step: int):
    """Rewrite a JSON-lines log keeping the complete records of steps before ``before_step`` (the steps a resumed
    run redoes, and a line cut by a kill, go)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", before_step) < before_step:
            kept.append(line + "\n")
    temporary = path.with_suffix(".partial")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)


def _fail(message):
    print(f"python -m dypo.train: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _progress(total, initial, enabled=True):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="steps", file=sys.stderr, disable=None if enabled else True,
                leave=False, dynamic_ncols=True)


def main(argv=None):
    config, resume, overwrite = parse_config(sys.argv[1:] if argv is None else argv, description=__doc__)
    out = Path(config.output_dir)
    if resume is None and not overwrite and ((out / "config.json").exists() or any(out.glob("checkpoint-*"))):
        _fail(f"output_dir {out} holds a run: --resume {out} continues it, --overwrite_output_dir starts afresh")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    for name in ("prompts_per_step", "train_batch_size"):
        if getattr(config, name) % size:
            _fail(f"{name} ({getattr(config, name)}) must be a multiple of the number of processes ({size})")
    world = distributed.init_world(config.ddp_timeout)
    finished = False
    try:
        summary = _run(config, resume, overwrite, world)
        finished = True
        return summary
    except (DataError, RewardError, policy.ModelError, checkpoint.CheckpointError) as exc:
        _fail(exc)
    finally:
        distributed.close(world, finished)


def check_encodable(codec, problems):
    """Every prompt and teacher solution through the tokenizer before any training, so that a bad record is an
    error up front rather than mid-run."""
    for problem in problems:
        try:
            codec.prompt_ids(problem.prompt)
            for solution in problem.teacher_solutions:
                codec.solution_ids(solution)
        except Exception as exc:  # tokenizers and chat templates raise many unrelated types
            raise DataError(f"{problem.source or 'a prompt'}: cannot be tokenized ({exc})") from None


def _clear_run(out: Path):
    """--overwrite_output_dir: delete what an earlier run left (only the files a run writes)."""
    for old in [*out.glob("checkpoint-*"), *out.glob(".checkpoint-*"), out / "final_model"]:
        shutil.rmtree(old, ignore_errors=True)
    for name in ("config.json", "metrics.jsonl", "samples.jsonl", "summary.json", *plots.PLOTS):
        (out / name).unlink(missing_ok=True)


def _run(config: Config, resume: Optional[Path], overwrite=False, world=None):
    world = world or distributed.World()
    problems, eval_problems = load_data(config)
    trainer = Trainer(config, problems, load_reward(config.reward), world)
    check_encodable(trainer.codec, (problems or []) + eval_problems)
    out = Path(config.output_dir)
    if world.main:
        if overwrite:
            _clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
    world.barrier()
    saved = checkpoint.checkpoints(out) if resume else []
    if saved:
        state = checkpoint.load_any(saved[-1], trainer.policy, trainer.model, trainer.optimizer, trainer.scheduler,
                                    world, seed=config.seed)
        trainer.load_state(state)
        accuracy_before, elapsed = state["eval_accuracy_before"], state["seconds"]
        _say(world, f"resumed {out} from {saved[-1].name}")
    else:
        if resume:
            _say(world, f"{out} has no checkpoint yet: starting from step 0")
        accuracy_before, elapsed = trainer.evaluate(eval_problems), 0.0
    if world.main:
        config_file = out / "config.json.partial"
        config_file.write_text(json.dumps(dataclasses.asdict(config), indent=2))
        os.replace(config_file, out / "config.json")
        for log in ("metrics.jsonl", "samples.jsonl"):
            _kept_lines(out / log, trainer.step)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if world.main and (out / "metrics.jsonl").exists() else []
    started = time.monotonic() - elapsed
    bar = _progress(config.max_steps, trainer.step, enabled=world.main)
    with contextlib.ExitStack() as files:
        metrics_log, samples_log = (files.enter_context(open(out / name if world.main else os.devnull, "a"))
                                    for name in ("metrics.jsonl", "samples.jsonl"))
        while trainer.step < config.max_steps:
            step = trainer.step
            metrics, samples = trainer.train_step(step)
            metrics["seconds"] = time.monotonic() - started
            trainer.step += 1
            history.append(metrics)
            metrics_log.write(json.dumps(metrics) + "\n")
            metrics_log.flush()
            if (step + 1) % config.sample_steps == 0:
                samples_log.write("".join(json.dumps(s) + "\n" for s in samples))
                samples_log.flush()
            bar.update(1)
            if world.main and ((step + 1) % config.logging_steps == 0 or step + 1 == config.max_steps):
                bar.write(_progress_line(history[-config.logging_steps:], step + 1, config.max_steps), file=sys.stdout)
                sys.stdout.flush()
            if (step + 1) % config.save_steps == 0 or step + 1 == config.max_steps:
                state = trainer.state({"eval_accuracy_before": accuracy_before, "seconds": metrics["seconds"]})
                if world.distributed:
                    checkpoint.save_sharded(out, trainer.step, trainer.policy, trainer.optimizer, trainer.scheduler,
                                            state, world, keep=config.save_total_limit)
                else:
                    checkpoint.save(out, trainer.step, trainer.model, trainer.optimizer, trainer.scheduler, state,
                                    keep=config.save_total_limit)
    bar.close()
    accuracy_after = trainer.evaluate(eval_problems)
    return _finish(config, out, history, accuracy_before, accuracy_after, len(eval_problems), trainer)


def _say(world, line):
    if world.main:
        print(line, flush=True)


def _window_mean(window, key):
    values = [m[key] for m in window if m.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")


def _progress_line(window, step, max_steps):
    mean = {key: _window_mean(window, key) for key in ("reward_mean", "share_hard", "share_mid", "share_easy",
                                                      "offline_ratio", "entropy", "loss")}
    return (f"step {step:4d}/{max_steps} reward {mean['reward_mean']:.2f} "
            f"hard/mid/easy {mean['share_hard']:.2f}/{mean['share_mid']:.2f}/{mean['share_easy']:.2f} "
            f"offline {mean['offline_ratio']:.2f} entropy {mean['entropy']:.2f} loss {mean['loss']:.3f} "
            f"({window[-1]['seconds']:.0f} s)")


def _finish(config, out, history, accuracy_before, accuracy_after, eval_prompts, trainer):
    intervals = [history[i:i + config.logging_steps] for i in range(0, len(history), config.logging_steps)]

    def curve(key):
        return [round(_window_mean(window, key), 4) for window in intervals]

    summary = {"eval_accuracy_before": accuracy_before, "eval_accuracy_after": accuracy_after,
               "eval_prompts": eval_prompts, "steps": len(history),
               "updates": trainer.updates, "seconds": history[-1]["seconds"] if history else 0.0,
               "reward_curve": curve("reward_mean"), "hard_share_curve": curve("share_hard"),
               "mid_share_curve": curve("share_mid"), "easy_share_curve": curve("share_easy"),
               "offline_ratio_curve": curve("offline_ratio"), "entropy_curve": curve("entropy"),
               "runtime": trainer.runtime.describe()}
    if config.model:
        weights = trainer.full_state_dict()
        if trainer.world.main:
            trainer.model.save_pretrained(out / "final_model", state_dict=weights)
            trainer.codec.tokenizer.save_pretrained(out / "final_model")
    if not trainer.world.main:
        return summary
    summary["plots"] = plots.write_plots(history, out, window=config.logging_steps)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    n = config.logging_steps
    print(f"reward per {n} steps:     {' '.join(f'{v:.2f}' for v in summary['reward_curve'])}")
    print(f"hard share per {n} steps: {' '.join(f'{v:.2f}' for v in summary['hard_share_curve'])}")
    print(f"easy share per {n} steps: {' '.join(f'{v:.2f}' for v in summary['easy_share_curve'])}")
    print(f"eval accuracy: {accuracy_before:.2f} -> {accuracy_after:.2f} ({summary['eval_prompts']} greedy prompts); "
          f"run directory: {out}")
    return summary


if __name__ == "__main__":
    main()
