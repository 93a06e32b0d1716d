"""The policy: the embedded tiny Qwen2 or a local Hugging Face causal LM directory, its tokenizer as a Codec, the
device and the optional GPU features (bf16 autocast, flash-attn, Liger-Kernel's patches), and the two ways the
trainer runs it: generation, and a forward to the last hidden states (the fused losses take lm_head.weight, so no
[batch, tokens, vocab] logits are built)."""

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import List

import torch

from dypo import task


class ModelError(ValueError):
    """A --model directory or GPU option that cannot be used; the message names it."""


class CharCodec:
    """The embedded character tokenizer: BOS + prompt; solutions end with EOS."""

    def __init__(self):
        self.tokenizer = task.CharTokenizer()
        self.eos_id, self.pad_id = task.EOS, task.PAD
        self.eos_ids = [task.EOS]

    def _encode(self, text):
        if not isinstance(text, str) or set(text) - set(task.CHARACTERS):
            raise ModelError(f"the embedded model's tokenizer only knows {task.CHARACTERS!r}; got {text!r} (use "
                             "--model with --data)")
        return self.tokenizer.encode(text)

    def prompt_ids(self, prompt) -> List[int]:
        return [task.BOS] + self._encode(prompt)

    def solution_ids(self, text: str) -> List[int]:
        return self._encode(text) + [task.EOS]

    def text(self, ids) -> str:
        return self.tokenizer.decode(ids)


class HFCodec:
    """A Hugging Face tokenizer; prompts go through its chat template when it has one (a plain string prompt
    becomes one user message), solutions are the assistant text followed by EOS. Rollouts stop at the tokenizer's
    EOS or any of the model's generation EOS ids (``extra_eos_ids``)."""

    def __init__(self, tokenizer, extra_eos_ids=()):
        if tokenizer.eos_token_id is None:
            raise ModelError("the tokenizer has no eos_token: rollouts could not stop")
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.eos_ids = [self.eos_id] + [i for i in extra_eos_ids if i != self.eos_id]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prompt_ids(self, prompt) -> List[int]:
        if self.tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return self.tokenizer(text)["input_ids"]

    def solution_ids(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def text(self, ids) -> str:
        return self.tokenizer.decode(until_eos(ids, self.eos_ids, keep=False), skip_special_tokens=True)


def until_eos(ids, eos_ids, keep=True):
    """ids up to the first EOS (kept or not)."""
    ids = list(ids)
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[:position + 1] if keep else ids[:position]
    return ids


@dataclass
class Runtime:
    """Where and how the policy runs: the device, the autocast dtype (None: full precision), the attention
    implementation and whether Liger-Kernel's patches were applied."""

    device: torch.device
    autocast_dtype: torch.dtype = None
    attn_implementation: str = "sdpa"
    liger: bool = False

    def describe(self):
        dtype = None if self.autocast_dtype is None else str(self.autocast_dtype).removeprefix("torch.")
        return {"device": str(self.device), "autocast": dtype, "attention": self.attn_implementation,
                "liger": self.liger}

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def resolve_runtime(config, device=None) -> Runtime:
    cuda = torch.cuda.is_available()
    device = device if device is not None else torch.device("cuda" if cuda else "cpu")
    bf16 = config.bf16 == "true" or (config.bf16 == "auto" and cuda and torch.cuda.is_bf16_supported())
    attention = config.attn_implementation
    if attention == "auto":
        attention = "flash_attention_2" if cuda and bf16 and importlib.util.find_spec("flash_attn") else "sdpa"
    elif attention.startswith("flash_attention") and not cuda:
        raise ModelError(f"attn_implementation {attention} needs CUDA; this machine has none")
    if config.use_liger_kernel == "true" and not cuda:
        raise ModelError("use_liger_kernel true needs CUDA (Liger-Kernel's kernels are Triton); this machine has none")
    return Runtime(device, torch.bfloat16 if bf16 else None, attention, config.use_liger_kernel == "true")


# the embedded Qwen2: its hidden size splits into TINY_HEADS heads, each of an even size (rotary positions rotate
# pairs of channels), so --hidden_size must be a multiple of 2 * TINY_HEADS (config.py checks it)
TINY_HEADS, TINY_KV_HEADS, TINY_POSITIONS = 4, 2, 64


def tiny_model(config, vocab_size, attention):
    """The embedded Qwen2 of ``config``'s hidden_size and num_layers, randomly initialised (load_policy loads the
    base model's weights into it under ``--init base``)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model_config = Qwen2Config(vocab_size=vocab_size, hidden_size=config.hidden_size,
                               intermediate_size=2 * config.hidden_size, num_hidden_layers=config.num_layers,
                               num_attention_heads=TINY_HEADS, num_key_value_heads=TINY_KV_HEADS,
                               max_position_embeddings=TINY_POSITIONS,
                               tie_word_embeddings=False, pad_token_id=task.PAD, bos_token_id=task.BOS,
                               eos_token_id=task.EOS, attn_implementation=attention)
    return Qwen2ForCausalLM(model_config)


def _loaded(directory, option, load):
    """load(), its exception a ModelError naming the option and directory."""
    try:
        return load()
    except Exception as exc:  # transformers, safetensors and tokenizers raise many unrelated types here
        raise ModelError(f"{option} {directory}: cannot load it ({(str(exc).splitlines() or [type(exc).__name__])[0]})"
                         ) from None


def _model_directory(directory, option):
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise ModelError(f"{option} {directory}: not a Hugging Face model directory (no config.json there); "
                         "nothing is downloaded, give a local directory")
    return path


def pretrained_model(directory, attention, option="--model"):
    """The fp32 causal LM of a local Hugging Face directory (nothing is downloaded); a ModelError naming ``option``
    when it is not one or cannot be loaded."""
    from transformers import AutoModelForCausalLM

    path = _model_directory(directory, option)
    return _loaded(directory, option, lambda: AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=torch.float32, attn_implementation=attention))


def _pretrained(directory, attention):
    from transformers import AutoTokenizer

    path = _model_directory(directory, "--model")
    tokenizer = _loaded(directory, "--model", lambda: AutoTokenizer.from_pretrained(path, local_files_only=True))
    model = pretrained_model(directory, attention)
    eos = model.generation_config.eos_token_id
    return model, HFCodec(tokenizer, eos if isinstance(eos, list) else [] if eos is None else [eos])


@torch.no_grad()
def check_head(model, directory, runtime, option="--model"):
    """The fused losses compute lm_head(last hidden state); refuse models whose logits are anything else (soft
    capping, logit scaling, multipliers), checked on a few tokens."""
    ids = torch.arange(8, device=next(model.parameters()).device).remainder(model.config.vocab_size).unsqueeze(0)
    weight, bias = lm_head(model)
    with runtime.autocast():
        logits = model(input_ids=ids, use_cache=False).logits.float()
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        projected = torch.nn.functional.linear(hidden, weight, bias).float()
    if not torch.allclose(logits, projected, rtol=1e-3, atol=1e-3 * (1 + projected.abs().max().item())):
        raise ModelError(f"{option} {directory}: its logits are not lm_head(last hidden state) (a scaled or "
                         "soft-capped output head?); the fused losses do not support it")


def check_positions(model, longest_prompt: int, max_new_tokens: int, directory=""):
    """The longest prompt plus max_new_tokens against the model's max_position_embeddings, once at start: a
    ModelError for learned absolute positions (an embedding table with that many rows, as GPT-2's wpe: there is no
    row for a later position), else a warning to print (rotary positions, as Qwen2's or Llama's, go on past it,
    untrained there), or None when everything fits."""
    limit = getattr(model.config, "max_position_embeddings", None)
    needed = longest_prompt + max_new_tokens
    if not isinstance(limit, int) or needed <= limit:
        return None
    tokens = model.get_input_embeddings()
    learned = any(isinstance(module, torch.nn.Embedding) and module is not tokens and
                  limit <= module.num_embeddings <= limit + 2 for module in model.modules())  # OPT's: limit + 2
    which = f"--model {directory}" if directory else "the embedded model"
    text = (f"the longest prompt ({longest_prompt} tokens) + max_new_tokens ({max_new_tokens}) = {needed} positions, "
            f"more than {which}'s max_position_embeddings ({limit})")
    if learned:
        raise ModelError(f"{text}: its learned position embeddings end there; lower --max_new_tokens or shorten the "
                         "prompts")
    return f"{text}: positions past it were never trained"


def _apply_liger(model, runtime, config):
    if not runtime.device.type == "cuda" or config.use_liger_kernel == "false":
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        if config.use_liger_kernel == "true":
            raise ModelError("use_liger_kernel true: liger-kernel is not installed") from None
        return False
    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        if config.use_liger_kernel == "true":
            raise ModelError(f"use_liger_kernel true: Liger-Kernel has no patches for {model.config.model_type}")
        return False
    _apply_liger_kernel_to_instance(model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return True


def load_policy(config, device=None, on_device=True):
    """(model, Codec, Runtime) for the config's --model, or the embedded tiny model; the model on the runtime's
    device, or with ``on_device=False`` still in host memory (FSDP2's fully_shard moves each unit it shards)."""
    runtime = resolve_runtime(config, device)
    if config.model:
        model, codec = _pretrained(config.model, runtime.attn_implementation)
    else:
        codec = CharCodec()
        model = tiny_model(config, codec.tokenizer.vocab_size, runtime.attn_implementation)
        if config.init == "base":
            from safetensors.torch import load_model

            from dypo import pretrain

            load_model(model, str(pretrain.base_model(config) / "model.safetensors"))
    runtime.liger = _apply_liger(model, runtime, config)
    if on_device:
        model.to(runtime.device)
    if config.model:
        check_head(model, config.model, runtime)
    return model, codec, runtime


class FusedHead(torch.nn.Module):
    """The causal LM run to its last hidden states, then a fused op fed with them and lm_head's weight and bias:
    ``forward(ids, attention_mask, fused)`` returns ``fused(hidden [B, L - 1, D], weight, bias)``, the positions
    that predict a next token. The fused op runs inside this module's forward so that FSDP2 gathers the lm_head
    weight for it (and reduce-scatters its gradient); under bf16 autocast, hidden states and weights reach it in
    bf16 (the last hidden state leaves autocast in fp32; the fused kernels accumulate in fp32 either way)."""

    def __init__(self, model, runtime):
        super().__init__()
        self.model, self.runtime = model, runtime

    def forward(self, ids, attention_mask, fused):
        hidden = last_hidden(self.model, ids, attention_mask, self.runtime)[:, :-1]
        weight, bias = lm_head(self.model)
        dtype = self.runtime.autocast_dtype or weight.dtype
        return fused(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def last_hidden(model, ids, attention_mask, runtime):
    """The decoder's last hidden states [B, L, D] (the lm_head is not applied)."""
    with runtime.autocast():
        return model.get_decoder()(input_ids=ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def lm_head(model):
    """(weight [V, D], bias [V] or None) of the output projection."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


@torch.no_grad()
def generate(model, codec, runtime, prompt_ids, *, max_new_tokens, temperature, greedy=False, batch_size=0):
    """Completion token ids of each prompt (through its first EOS, which is kept). Sampling is from
    softmax(logits / temperature) alone: a fresh generation config replaces the model's, whose repetition
    penalties, top-k/top-p and the like would make the rollouts come from another distribution than the one the
    losses' log-probs describe. ``batch_size`` prompts per generate() call (0: all at once)."""
    if batch_size and len(prompt_ids) > batch_size:
        return [completion for start in range(0, len(prompt_ids), batch_size)
                for completion in generate(model, codec, runtime, prompt_ids[start:start + batch_size],
                                           max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy)]
    from transformers import GenerationConfig

    width = max(map(len, prompt_ids))
    ids = torch.tensor([[codec.pad_id] * (width - len(p)) + p for p in prompt_ids], device=runtime.device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=runtime.device)
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": 0,
                                                    "top_p": 1.0}
    generation = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=codec.eos_ids,
                                  pad_token_id=codec.pad_id, **sampling)
    # swapped in rather than passed: generate() fills a passed config's default-valued fields from the model's
    model_defaults, model.generation_config = model.generation_config, generation
    try:
        with runtime.autocast():
            # no per-token sync across ranks: the caller has gathered the parameters (distributed.gathered)
            out = model.generate(ids, attention_mask=attention, synced_gpus=False)
    finally:
        model.generation_config = model_defaults
    return [until_eos(row, codec.eos_ids) for row in out[:, width:].tolist()]
