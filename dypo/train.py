"""python -m dypo.train: DYPO end to end on the embedded default (a tiny Qwen2 model from a config, a character
tokenizer, multi-digit addition with two rule-based teachers), on a CPU in minutes.

Each step: k rollouts per prompt -> exact-match rewards -> group_advantages (advantages and grades) -> routing
(hard: SFT on one teacher solution drawn uniformly; mid: the rollouts, alpha GRPO + (1 - alpha) GAL; easy: dropped)
-> one policy forward to hidden states -> dypo_loss with lm_head.weight (no logits) -> clip -> optimizer step.
Strategies: dypo (default), grpo, sft, sft_then_rl. This first version covers the embedded default only (issue 6
lists what is still to come: real models and data, checkpoints and resume, plots, YAML configs).
"""

import argparse
import copy
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch

from dypo import task
from dypo_kernels import Grade, Route, dypo_loss, fused_linear_logprobs, group_advantages

STRATEGIES = ("dypo", "grpo", "sft", "sft_then_rl")


@dataclasses.dataclass
class Config:
    """Defaults of the embedded run; TRL's names where TRL has the same knob."""

    output_dir: str = "runs/dypo-tiny"
    strategy: str = "dypo"
    max_steps: int = 1500
    seed: int = 0
    learning_rate: float = 3e-3
    num_generations: int = 8  # k rollouts per prompt
    prompts_per_step: int = 8
    max_digits: int = 2
    max_new_tokens: int = 10
    temperature: float = 1.0
    alpha: float = 0.5
    gamma: float = 1.0
    beta_gal: float = 1.0
    beta: float = 0.0  # KL to the reference (beta_kl)
    epsilon_high: float = 0.2
    loss_type: str = "grpo"
    switch_gate: int = 0  # plain GRPO before this step
    max_grad_norm: float = 1.0
    logging_steps: int = 150
    eval_prompts: int = 64
    hidden_size: int = 64
    num_layers: int = 2


def build_model(config: Config, vocab_size: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model_config = Qwen2Config(vocab_size=vocab_size, hidden_size=config.hidden_size,
                               intermediate_size=2 * config.hidden_size, num_hidden_layers=config.num_layers,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               tie_word_embeddings=False, pad_token_id=task.PAD, bos_token_id=task.BOS,
                               eos_token_id=task.EOS)
    return Qwen2ForCausalLM(model_config)


def left_padded(tokenizer, prompts):
    encoded = [[task.BOS] + tokenizer.encode(p) for p in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[task.PAD] * (width - len(e)) + e for e in encoded])
    return ids, (ids != task.PAD).long()


@torch.no_grad()
def generate(model, tokenizer, prompts, config, greedy=False):
    """Completions (strings, cut at EOS) of each prompt."""
    ids, attention = left_padded(tokenizer, prompts)
    out = model.generate(ids, attention_mask=attention, do_sample=not greedy, temperature=config.temperature,
                         max_new_tokens=config.max_new_tokens, eos_token_id=task.EOS,
                         pad_token_id=task.PAD)
    return [tokenizer.decode(row[ids.shape[1]:].tolist()) for row in out]


def evaluate(model, tokenizer, problems, config):
    completions = generate(model, tokenizer, [p.prompt for p in problems], config, greedy=True)
    return sum(task.exact_match(c, p.answer) for c, p in zip(completions, problems)) / len(problems)


def route_groups(grades, strategy, step, config):
    """The Route of each prompt's group from its Grade: what DYPO does, or the comparison strategies."""
    plain_rl = strategy == "grpo" or (strategy == "dypo" and step < config.switch_gate) or \
        (strategy == "sft_then_rl" and step >= config.max_steps // 2)
    routes = []
    for grade in grades:
        if strategy == "sft" or (strategy == "sft_then_rl" and not plain_rl):
            routes.append(Route.SFT)
        elif grade == Grade.EASY:
            routes.append(Route.SKIP)
        elif grade == Grade.HARD and not plain_rl:
            routes.append(Route.SFT)
        else:
            routes.append(Route.RL)
    return routes, (1.0 if plain_rl else config.alpha)


def training_batch(tokenizer, rows):
    """rows: (prompt, completion, route, reward, group). Right-padded input ids, targets (next tokens, -1 where
    unused) and the completion mask, all [B, L - 1]."""
    sequences = [[task.BOS] + tokenizer.encode(p) + tokenizer.encode(c) + [task.EOS] for p, c, *_ in rows]
    width = max(map(len, sequences))
    ids = torch.full((len(rows), width), task.PAD)
    mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for i, ((prompt, *_), sequence) in enumerate(zip(rows, sequences)):
        ids[i, :len(sequence)] = torch.tensor(sequence)
        mask[i, len(prompt):len(sequence) - 1] = True  # positions predicting the completion and its EOS
    targets = ids[:, 1:].masked_fill(~mask, -1)
    return ids, targets, mask


def train_step(model, reference, optimizer, tokenizer, problems, config, step, rng):
    """One DYPO step; returns its metrics."""
    k = config.num_generations
    prompts = [p.prompt for p in problems for _ in range(k)]
    completions = generate(model, tokenizer, prompts, config)
    rewards = torch.tensor([task.exact_match(c, problems[i // k].answer) for i, c in enumerate(completions)])
    graded = group_advantages(rewards, group_size=k)
    routes, alpha = route_groups(graded.grade.tolist(), config.strategy, step, config)
    rows = []
    for g, (problem, route) in enumerate(zip(problems, routes)):
        if route == Route.RL:
            rows += [(problem.prompt, completions[g * k + j], Route.RL, rewards[g * k + j].item(), g)
                     for j in range(k)]
        elif route == Route.SFT:
            rows.append((problem.prompt, rng.choice(problem.teacher_solutions), Route.SFT, 1.0, g))
    metrics = {"step": step, "reward_mean": rewards.mean().item(),
               **{f"share_{grade.name.lower()}": (graded.grade == grade).float().mean().item() for grade in Grade},
               "offline_ratio": sum(r == Route.SFT for r in routes) / len(routes)}
    if not rows:
        return {**metrics, "loss": 0.0}
    ids, targets, mask = training_batch(tokenizer, rows)
    used_groups = sorted({row[4] for row in rows})
    group_index = torch.tensor([used_groups.index(row[4]) for row in rows])
    route = torch.tensor([int(row[2]) for row in rows])
    row_rewards = torch.tensor([row[3] for row in rows])
    weight = model.lm_head.weight
    with torch.no_grad():
        ref_hidden = reference.model(ids).last_hidden_state[:, :-1]
        ref_logps = fused_linear_logprobs(ref_hidden, reference.lm_head.weight, targets, ignore_index=-1)
    hidden = model.model(ids).last_hidden_state[:, :-1]
    with torch.no_grad():
        old_logps = fused_linear_logprobs(hidden.detach(), weight.detach(), targets, ignore_index=-1)
    loss, loss_metrics = dypo_loss(hidden, weight, targets.clamp(min=0), mask=mask, route=route, rewards=row_rewards,
                                   group_index=group_index, old_logps=old_logps,
                                   ref_logps=ref_logps, alpha=alpha, gamma=config.gamma, beta_gal=config.beta_gal,
                                   beta_kl=config.beta, eps_high=config.epsilon_high, loss_type=config.loss_type,
                                   return_metrics=True)
    optimizer.zero_grad()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    return {**metrics, "loss": loss.item(), "grad_norm": grad_norm.item(),
            **{name: float(value) for name, value in loss_metrics.items()}}


class _OneLineParser(argparse.ArgumentParser):
    """Bad options end the run with one line naming the problem and exit status 2, without the usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _check_config(config: Config, fail):
    from dypo_kernels.sweep import LOSS_TYPES

    if config.strategy not in STRATEGIES:
        fail(f"strategy must be one of {', '.join(STRATEGIES)}; got {config.strategy!r}")
    if config.loss_type not in LOSS_TYPES:
        fail(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {config.loss_type!r}")
    for name in ("max_steps", "num_generations", "prompts_per_step", "max_digits", "max_new_tokens", "logging_steps",
                 "eval_prompts", "hidden_size", "num_layers"):
        if getattr(config, name) < 1:
            fail(f"{name} must be a positive integer; got {getattr(config, name)}")
    for name in ("learning_rate", "temperature"):
        if not getattr(config, name) > 0:
            fail(f"{name} must be positive; got {getattr(config, name)}")
    if not 0 <= config.alpha <= 1:
        fail(f"alpha must lie in [0, 1]; got {config.alpha}")
    for name in ("gamma", "beta_gal", "beta", "epsilon_high", "switch_gate", "max_grad_norm"):
        if getattr(config, name) < 0:
            fail(f"{name} must be >= 0; got {getattr(config, name)}")


def parse_config(argv):
    """Config from the defaults, then a YAML file (``--config``), then ``--key value`` options."""
    parser = _OneLineParser(prog="python -m dypo.train", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of options (its keys: the options below, without --)")
    fields = {field.name: field for field in dataclasses.fields(Config)}
    for field in fields.values():
        parser.add_argument(f"--{field.name}", type=field.type, default=None, help=f"default: {field.default}")
    options = vars(parser.parse_args(argv))
    values = {}
    config_file = options.pop("config")
    if config_file is not None:
        import yaml

        try:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            parser.error(f"cannot read --config {config_file}: {exc}".replace("\n", " "))
        if not isinstance(loaded, dict):
            parser.error(f"--config {config_file} must hold a mapping of option: value")
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            parser.error(f"unknown key {unknown[0]!r} in {config_file}; valid keys: {', '.join(fields)}")
        for key, value in loaded.items():
            try:
                values[key] = fields[key].type(value)
            except (TypeError, ValueError):
                parser.error(f"{key} in {config_file} must be a {fields[key].type.__name__}; got {value!r}")
    values.update({key: value for key, value in options.items() if value is not None})
    config = Config(**values)
    _check_config(config, parser.error)
    return config


def main(argv=None):
    config = parse_config(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer = task.CharTokenizer()
    model = build_model(config, tokenizer.vocab_size)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    eval_problems = task.make_problems(random.Random(config.seed + 1), config.eval_prompts, config.max_digits)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    accuracy_before = evaluate(model, tokenizer, eval_problems, config)
    history = []
    started = time.monotonic()
    with open(out / "metrics.jsonl", "w") as log:
        for step in range(config.max_steps):
            problems = task.make_problems(rng, config.prompts_per_step, config.max_digits)
            metrics = train_step(model, reference, optimizer, tokenizer, problems, config, step, rng)
            metrics["seconds"] = time.monotonic() - started
            history.append(metrics)
            log.write(json.dumps(metrics) + "\n")
            if (step + 1) % config.logging_steps == 0 or step + 1 == config.max_steps:
                window = history[-config.logging_steps:]
                mean = {key: sum(m.get(key, 0.0) for m in window) / len(window)
                        for key in ("reward_mean", "share_hard", "share_mid", "share_easy", "offline_ratio")}
                print(f"step {step + 1:4d}/{config.max_steps} reward {mean['reward_mean']:.2f} "
                      f"hard/mid/easy {mean['share_hard']:.2f}/{mean['share_mid']:.2f}/{mean['share_easy']:.2f} "
                      f"offline {mean['offline_ratio']:.2f} loss {metrics['loss']:.3f} "
                      f"({metrics['seconds']:.0f} s)", flush=True)
    accuracy_after = evaluate(model, tokenizer, eval_problems, config)
    intervals = [history[i:i + config.logging_steps] for i in range(0, len(history), config.logging_steps)]

    def curve(key):
        return [round(sum(m[key] for m in window) / len(window), 2) for window in intervals]

    summary = {"eval_accuracy_before": accuracy_before, "eval_accuracy_after": accuracy_after, "steps": len(history),
               "reward_curve": curve("reward_mean"), "hard_share_curve": curve("share_hard"),
               "mid_share_curve": curve("share_mid"), "easy_share_curve": curve("share_easy")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"reward per {config.logging_steps} steps:     {' '.join(f'{v:.2f}' for v in summary['reward_curve'])}")
    print(f"hard share per {config.logging_steps} steps: {' '.join(f'{v:.2f}' for v in summary['hard_share_curve'])}")
    print(f"easy share per {config.logging_steps} steps: {' '.join(f'{v:.2f}' for v in summary['easy_share_curve'])}")
    print(f"eval accuracy: {accuracy_before:.2f} -> {accuracy_after:.2f} ({config.eval_prompts} greedy prompts); "
          f"run directory: {out}")
    return summary


if __name__ == "__main__":
    main()
