"""The trainer's configuration: one dataclass with documented defaults (TRL's names where TRL has the same knob),
set by a YAML file (``--config``) and ``--key value`` options; bad keys and values end the run with one line and
exit status 2."""

import argparse
import dataclasses
import json
import math
from pathlib import Path

STRATEGIES = ("dypo", "grpo", "sft", "sft_then_rl", "sft_rl", "luffy")
INITS = ("base", "random")
SCHEDULES = ("constant", "linear", "cosine")
SFT_TEACHERS = ("one", "all")
SWITCHES = ("auto", "true", "false")
HARD_LOSSES = ("sft", "kl", "sft_kl")
# what --resume may change: how long the run goes on, what it logs, and how its work is cut into pieces to fit in
# memory (the chunk sizes; generation_batch_size changes which random numbers each rollout draws), and which engine
# samples the rollouts (use_vllm), not the method
RESUMABLE = ("max_steps", "logging_steps", "plots", "save_steps", "save_total_limit", "sample_steps", "num_samples",
             "ddp_timeout", "micro_batch_size", "log_prob_micro_batch_size", "generation_batch_size", "use_vllm",
             "vllm_gpu_memory_utilization", "vllm_max_model_length", "output_dir")


def option(default, help, switch=False):
    return dataclasses.field(default=default, metadata={"help": help, "switch": switch})


@dataclasses.dataclass
class Config:
    """Defaults: the embedded run (a tiny model on built-in additions, on a CPU in about a minute). For real models
    the paper's values are alpha 0.5, beta_gal 1, num_generations 8, learning_rate 1e-6."""

    # run
    output_dir: str = option("runs/dypo-tiny", "run directory (config, metrics, samples, plots, checkpoints)")
    strategy: str = option("dypo", f"one of {', '.join(STRATEGIES)} (docs/trainer.md, Strategies)")
    max_steps: int = option(1500, "generation steps (each: prompts_per_step prompts x num_generations rollouts)")
    seed: int = option(0, "seed of the data order, sampling and initialisation")
    logging_steps: int = option(150, "steps per progress line (and per point of the summary's curves)")
    save_steps: int = option(500, "steps between checkpoints (the last step is always saved)")
    save_total_limit: int = option(2, "checkpoints kept (older ones are deleted)")
    ddp_timeout: int = option(1800, "torchrun: seconds a collective may wait before a missing rank ends the run")
    plots: bool = option(True, "write the PNG plots of the run into output_dir: true, false")
    sample_steps: int = option(150, "steps between writes of sample completions to samples.jsonl")
    num_samples: int = option(4, "completions written each time")
    # model
    model: str = option("", "local Hugging Face causal LM directory; empty: the embedded tiny Qwen2")
    hidden_size: int = option(64, "embedded model only: hidden size")
    num_layers: int = option(2, "embedded model only: decoder layers")
    init: str = option("base", "embedded model only: base (the built-in base model, pretrained once and cached: "
                               "python -m dypo.pretrain) or random (a random initialisation)")
    bf16: str = option("auto", "bf16 autocast: auto (on when CUDA supports it), true, false",
                       switch=True)
    attn_implementation: str = option("auto", "auto (flash_attention_2 when flash-attn is installed on CUDA, "
                                              "else sdpa), or any transformers value: eager, sdpa, flash_attention_2")
    use_liger_kernel: str = option("auto", "Liger-Kernel's RMSNorm/SwiGLU/RoPE patches: auto (on CUDA when "
                                           "installed and the architecture has them), true, false",
                                   switch=True)
    # data and reward
    data: str = option("", "JSONL or Parquet file of prompts; empty: the built-in addition task")
    prompt_field: str = option("prompt", "data field of the prompt (a string or a list of chat messages)")
    answer_field: str = option("reward_model.ground_truth", "data field of the ground-truth answer (dots go into "
                                                            "nested records)")
    teachers_field: str = option("target", "data field of the teacher solutions (a list of strings or of "
                                           "messages with a content)")
    eval_data: str = option("", "file of evaluation prompts (same fields); empty: eval_prompts held out of --data "
                                "(or drawn from the built-in task)")
    ood_data: tuple = option((), "files of out-of-distribution evaluation prompts (same fields), one set each, "
                                 "never trained on; the built-in task has its own (docs/trainer.md)")
    eval_prompts: int = option(64, "evaluation prompts (greedy decoding, before and after training)")
    max_digits: int = option(2, "built-in task only: most digits per operand")
    reward: str = option("", "module:function called as f(prompts, completions, ground_truth=...) -> floats; "
                             "empty: exact match of the final answer (last number, or \\boxed{} content)")
    # rollouts
    num_generations: int = option(8, "rollouts per prompt (k)")
    prompts_per_step: int = option(8, "prompts sampled per step")
    max_new_tokens: int = option(12, "rollout length limit")
    temperature: float = option(1.0, "sampling temperature of the rollouts")
    # update
    train_batch_size: int = option(8, "prompts per update: an update fires whenever the SFT and RL queues "
                                      "together hold this many")
    micro_batch_size: int = option(0, "prompts per forward/backward of an update, gradients accumulated over the "
                                      "batch (each part normalised by the whole update's counts: exact for every "
                                      "loss_type); 0: the whole share at once")
    log_prob_micro_batch_size: int = option(0, "sequences per no-gradient scoring forward (old and reference "
                                               "log-probs); 0: all at once")
    generation_batch_size: int = option(0, "rollouts per generate() call; 0: all at once (vLLM batches by itself)")
    use_vllm: bool = option(False, "rollouts and evaluation through a colocated vLLM engine per process, weights "
                                   "loaded after each update: true (CUDA; pip install 'dypo-kernels[vllm]'), false")
    vllm_gpu_memory_utilization: float = option(0.3, "share of the GPU's memory vLLM reserves (weights, KV cache); "
                                                     "that much must be free when it starts")
    vllm_max_model_length: int = option(0, "longest prompt + completion vLLM serves (its KV cache must hold one); "
                                           "0: the model's maximum positions")
    learning_rate: float = option(1e-4, "AdamW learning rate (tiny model: dypo's rate in python -m dypo.compare's "
                                        "sweep; the paper's 1e-6 is for real models)")
    lr_scheduler_type: str = option("constant", f"one of {', '.join(SCHEDULES)} (after warmup)")
    warmup_ratio: float = option(0.0, "share of max_steps with a linear warmup")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    alpha: float = option(0.5, "mid prompts: alpha GRPO + (1 - alpha) GAL")
    gamma: float = option(1.0, "weight of the SFT term of hard prompts")
    beta_gal: float = option(1.0, "GAL sharpness beta_GAL")
    beta: float = option(0.0, "k3 KL to the reference model (beta_kl)")
    use_bias_correction_kl: bool = option(False, "the KL term weighted by the importance ratio (DeepSeek-V3.2's "
                                                 "unbiased KL gradient; TRL's option, true by default there): "
                                                 "true, false")
    epsilon: float = option(0.2, "lower clip range")
    epsilon_high: float = option(0.2, "upper clip range")
    loss_type: str = option("grpo", "RL objective and token aggregation: grpo, bnpo, dapo, dr_grpo, or the variants "
                                    "cispo (epsilon_high is then its ratio cap, e.g. 5), sapo, luspo")
    entropy_coef: float = option(0.0, "entropy bonus on the RL rows, aggregated as the policy loss (verl's "
                                      "entropy_coeff)")
    delta: float = option(0.0, "two-sided clip: cap of the ratio in the unclipped branch (INTELLECT-2); 0: none")
    importance_sampling_level: str = option("token", "token, or sequence (GSPO: one ratio per rollout)")
    sapo_temperature_pos: float = option(1.0, "loss_type sapo: gate temperature for positive advantages")
    sapo_temperature_neg: float = option(1.05, "loss_type sapo: gate temperature for negative advantages")
    scale_rewards: str = option("group", "advantage scaling: group, batch, none (Dr.GRPO)")
    switch_gate: int = option(0, "plain GRPO before this step (DYPO's routing after)")
    sft_teachers: str = option("one", "hard prompts: SFT on one teacher solution drawn uniformly, or on all")
    num_teachers: int = option(0, "teachers whose solutions are used: the first num_teachers of each problem's; "
                                  "0: all")
    luffy_gamma: float = option(0.1, "strategy luffy: policy shaping p / (p + luffy_gamma) of the teacher "
                                     "trajectory's token probabilities")
    hard_loss: str = option("sft", "hard prompts' loss on the drawn teacher trajectory: sft (eq. 5), kl (a "
                                   "divergence toward the teachers' next-token distributions on its solution tokens), "
                                   "sft_kl (gamma SFT + kl_coef KL)")
    kl_coef: float = option(1.0, "hard_loss kl, sft_kl: weight of the KL term")
    kl_divergence: str = option("forward_kl", "hard_loss kl, sft_kl: forward_kl, reverse_kl or jsd")
    kl_aggregate: str = option("mixture", "hard_loss kl, sft_kl: mixture (divergence from the teachers' average "
                                          "distribution) or mean (average of the divergences from each)")
    teacher_models: tuple = option((), "hard_loss kl, sft_kl: local Hugging Face causal LM directories sharing the "
                                       "student's vocabulary (one teacher each), or builtin (the built-in task's "
                                       "teachers as tiny models, trained once and cached)")
    teacher_topk_field: str = option("", "hard_loss kl, sft_kl: data field of stored teacher top-k log-probs, "
                                         "instead of teacher_models (docs/trainer.md)")

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if field.type is bool:
                setattr(self, field.name, _boolean(getattr(self, field.name)))
            if field.type is tuple and isinstance(getattr(self, field.name), list):
                setattr(self, field.name, tuple(getattr(self, field.name)))


def _boolean(value):
    """true/false, the spelling of the command line (and of config.json before booleans), as a bool; any other
    value as it is, for _check to refuse."""
    return {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value


def _check(config: Config, fail):
    from dypo_kernels.advantages import SCALES
    from dypo_kernels.combined import LOSS_TYPES
    from dypo_kernels.multi_teacher_kl.divergence import AGGREGATES, DIVERGENCES

    choices = {"strategy": STRATEGIES, "loss_type": LOSS_TYPES, "scale_rewards": SCALES,
               "lr_scheduler_type": SCHEDULES, "sft_teachers": SFT_TEACHERS, "bf16": SWITCHES,
               "importance_sampling_level": ("token", "sequence"),
               "use_liger_kernel": SWITCHES, "hard_loss": HARD_LOSSES, "init": INITS, "kl_divergence": DIVERGENCES,
               "kl_aggregate": AGGREGATES}
    for name, valid in choices.items():
        if getattr(config, name) not in valid:
            fail(f"{name} must be one of {', '.join(valid)}; got {getattr(config, name)!r}")
    for field in dataclasses.fields(config):
        if field.type is bool and not isinstance(getattr(config, field.name), bool):
            fail(f"{field.name} must be one of true, false; got {getattr(config, field.name)!r}")
    for name in ("max_steps", "num_generations", "prompts_per_step", "max_digits", "max_new_tokens", "logging_steps",
                 "eval_prompts", "hidden_size", "num_layers", "save_steps", "save_total_limit", "sample_steps",
                 "ddp_timeout", "train_batch_size"):
        if getattr(config, name) < 1:
            fail(f"{name} must be a positive integer; got {getattr(config, name)}")
    for field in dataclasses.fields(config):
        if field.type is float and not math.isfinite(getattr(config, field.name)):
            fail(f"{field.name} must be a finite number; got {getattr(config, field.name)}")
    for name in ("learning_rate", "temperature", "max_grad_norm"):
        if not getattr(config, name) > 0:
            fail(f"{name} must be positive; got {getattr(config, name)}")
    if not 0 < config.vllm_gpu_memory_utilization <= 1:
        fail(f"vllm_gpu_memory_utilization must lie in (0, 1]; got {config.vllm_gpu_memory_utilization}")
    if config.use_vllm and not 0.01 <= config.temperature <= 2:  # vLLM 0.31's SamplingParams
        fail(f"temperature must lie in [0.01, 2] with use_vllm true (vLLM's range); got {config.temperature}")
    for name in ("alpha", "warmup_ratio"):
        if not 0 <= getattr(config, name) <= 1:
            fail(f"{name} must lie in [0, 1]; got {getattr(config, name)}")
    if not 0 <= config.epsilon < 1:
        fail(f"epsilon must lie in [0, 1); got {config.epsilon}")
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        if not getattr(config, name) > 0:
            fail(f"{name} must be positive; got {getattr(config, name)}")
    if config.delta and config.loss_type in ("cispo", "sapo"):
        fail(f"delta caps the ratio of the clipped objective; loss_type {config.loss_type} has none")
    if config.importance_sampling_level == "sequence" and config.loss_type in ("cispo", "sapo"):
        fail(f"importance_sampling_level sequence is not defined for loss_type {config.loss_type}")
    if not config.luffy_gamma > 0:
        fail(f"luffy_gamma must be positive; got {config.luffy_gamma}")
    if config.strategy == "luffy" and config.loss_type not in ("grpo", "dapo"):
        fail(f"strategy luffy aggregates its on- and off-policy tokens as loss_type grpo (sequence means) or dapo "
             f"(token mean); got loss_type {config.loss_type}")
    if config.strategy == "luffy" and config.micro_batch_size:
        fail("strategy luffy takes each update whole: micro_batch_size must be 0")
    if config.strategy == "luffy" and config.num_generations < 2:
        fail("strategy luffy puts a teacher trajectory in place of one of num_generations rollouts: it needs at least "
             f"2; got {config.num_generations}")
    for name in ("gamma", "kl_coef", "beta_gal", "num_teachers", "beta", "epsilon_high", "delta", "switch_gate",
                 "weight_decay", "num_samples", "micro_batch_size", "log_prob_micro_batch_size",
                 "generation_batch_size", "vllm_max_model_length"):
        if getattr(config, name) < 0:
            fail(f"{name} must be >= 0; got {getattr(config, name)}")
    if config.reward and (config.reward.count(":") != 1 or not all(config.reward.split(":"))):
        fail(f"reward must look like module:function; got {config.reward!r}")
    if config.train_batch_size > config.max_steps * config.prompts_per_step:
        fail(f"train_batch_size ({config.train_batch_size}) is more than max_steps x prompts_per_step "
             f"({config.max_steps} x {config.prompts_per_step}): no update could ever fire")
    from dypo.policy import TINY_HEADS

    if not config.model and config.hidden_size % (2 * TINY_HEADS):
        fail(f"hidden_size must be a multiple of {2 * TINY_HEADS} for the embedded model ({TINY_HEADS} attention "
             f"heads, each of an even size for rotary positions); got {config.hidden_size}")
    if config.eval_data and not config.data:
        fail("eval_data needs data (the built-in task draws its own evaluation prompts)")
    if config.ood_data and not config.data:
        fail("ood_data needs data (the built-in task draws its own out-of-distribution prompts)")
    _check_teachers(config, fail)
    valid_attention = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
    if config.attn_implementation not in valid_attention:
        fail(f"attn_implementation must be one of {', '.join(valid_attention)}; got {config.attn_implementation!r}")


def _check_teachers(config, fail):
    """The teacher source of hard_loss kl and sft_kl: exactly one of teacher_models and teacher_topk_field."""
    from dypo.teachers import BUILTIN

    models, field = config.teacher_models, config.teacher_topk_field
    if not all(isinstance(model, str) and model for model in models):
        fail(f"teacher_models must be directories (non-empty strings); got {list(models)!r}")
    if models and field:
        fail("teacher_models and teacher_topk_field exclude each other: give one teacher source")
    if config.hard_loss == "sft":
        if models or field:
            fail(f"{'teacher_models' if models else 'teacher_topk_field'} is used by hard_loss kl or sft_kl only; "
                 "got hard_loss sft")
        return
    if not models and not field:
        fail(f"hard_loss {config.hard_loss} needs a teacher source: --teacher_models DIR [DIR ...] (or builtin) or "
             "--teacher_topk_field NAME")
    if config.strategy in ("grpo", "luffy"):
        fail(f"hard_loss {config.hard_loss} trains the hard prompts' teacher trajectories by SFT; strategy "
             f"{config.strategy} has none")
    if BUILTIN in models and (len(models) > 1 or config.model or config.data):
        fail("teacher_models builtin stands alone, for the built-in task and the embedded model (no --model, no "
             "--data)")
    if field and not config.data:
        fail("teacher_topk_field needs data (the records hold the top-k log-probs)")
    if field and (config.kl_divergence, config.kl_aggregate) != ("forward_kl", "mean"):
        fail("teacher_topk_field gives the mean of forward KLs to the stored teachers (fused_sparse_teacher_kl): "
             f"it needs kl_divergence forward_kl and kl_aggregate mean; got {config.kl_divergence}, "
             f"{config.kl_aggregate}")


class OneLineParser(argparse.ArgumentParser):
    """Bad options end the run with one line naming the problem and exit status 2, without the usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _typed(field, value, source, fail):
    if field.type is bool:
        return _boolean(value)
    if field.type is tuple:
        values = [value] if isinstance(value, str) else value
        if isinstance(values, list) and all(isinstance(item, str) for item in values):
            return tuple(values)
        fail(f"{field.name} in {source} must be a list of strings; got {value!r}")
    if isinstance(value, bool) and field.metadata.get("switch"):
        return "true" if value else "false"  # YAML reads true/false as booleans
    wrong = isinstance(value, bool) and field.type is not str or \
        field.type is int and isinstance(value, float) and not value.is_integer() or \
        field.type is not str and isinstance(value, (list, dict))
    if not wrong:
        try:
            return field.type(value)
        except (TypeError, ValueError):
            pass
    fail(f"{field.name} in {source} must be a {field.type.__name__}; got {value!r}")


def parse_config(argv, description=None):
    """(Config, resume run directory or None, --overwrite_output_dir) from the defaults, then ``--resume``'s saved
    config or a YAML file (``--config``), then ``--key value`` options."""
    parser = OneLineParser(prog="python -m dypo.train", description=description, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of options (its keys: the options below, without --)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint "
                                                            f"with its saved config (only {', '.join(RESUMABLE[:-1])} "
                                                            "may be given again)")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="start afresh in an output_dir that holds a run (its checkpoints and logs are deleted)")
    fields = {field.name: field for field in dataclasses.fields(Config)}
    for field in fields.values():
        default = str(field.default).lower() if field.type is bool else repr(field.default)
        kind = {bool: {"type": _boolean}, tuple: {"nargs": "+"}}.get(field.type, {"type": field.type})
        parser.add_argument(f"--{field.name}", **kind, default=None, help=f"{field.metadata['help']} (default: "
                                                                           f"{default})")
    options = vars(parser.parse_args(argv))
    config_file, resume = options.pop("config"), options.pop("resume")
    overwrite = options.pop("overwrite_output_dir")
    if config_file is not None and resume is not None:
        parser.error("--config and --resume exclude each other (a resumed run keeps its saved config)")
    values = {}
    if resume is not None:
        saved = Path(resume) / "config.json"
        if not saved.is_file():
            parser.error(f"--resume {resume}: no run directory there (missing {saved})")
        try:
            loaded = json.loads(saved.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            parser.error(f"--resume {resume}: cannot read {saved}: {exc}")
        source = str(saved)
    elif config_file is not None:
        import yaml

        try:
            loaded = yaml.safe_load(Path(config_file).read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as exc:
            parser.error(f"cannot read --config {config_file}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                         f"at offset {exc.start})")
        except (OSError, yaml.YAMLError) as exc:
            parser.error(f"cannot read --config {config_file}: {exc}".replace("\n", " "))
        source = config_file
    else:
        loaded, source = {}, None
    if not isinstance(loaded, dict):
        parser.error(f"{source} must hold a mapping of option: value")
    unknown = sorted(set(loaded) - set(fields))
    if unknown:
        parser.error(f"unknown key {unknown[0]!r} in {source}; valid keys: {', '.join(fields)}")
    for key, value in loaded.items():
        values[key] = _typed(fields[key], value, source, parser.error)
    given = {key: tuple(value) if fields[key].type is tuple else value for key, value in options.items()
             if value is not None}
    if resume is not None:
        changed = sorted(key for key, value in given.items() if key not in RESUMABLE and value != values.get(
            key, fields[key].default))
        if changed:
            parser.error(f"--resume keeps the run's config; {changed[0]} cannot change (only "
                         f"{', '.join(RESUMABLE[:-1])} can)")
        if overwrite:
            parser.error("--resume and --overwrite_output_dir exclude each other")
        given["output_dir"] = str(resume)
    values.update(given)
    config = Config(**values)
    _check(config, parser.error)
    return config, (Path(resume) if resume is not None else None), overwrite
