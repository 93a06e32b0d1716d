"""Rollouts and evaluation through a colocated vLLM engine (``--use_vllm true``; CUDA only).

Each process runs its own engine on its own GPU, in process (vLLM's ``external_launcher`` executor, as TRL's
colocate mode does), next to the policy it trains. Before it generates, the engine is given the policy's current
weights whenever an update has happened since the last time (every rank takes part: under FSDP2 each tensor is
gathered in turn, so no rank ever holds the whole model twice). The engine only samples tokens: the old and
reference log-probs that the losses use still come from the policy's own forward, so a difference between vLLM's
numerics and the policy's costs nothing but a ratio away from 1.

Sampling matches ``policy.generate``: softmax(logits / temperature) alone (top_k 0, top_p 1, min_p 0, the model's
generation config ignored: ``generation_config="vllm"``), greedy for evaluation, stopping at any of the codec's EOS
ids (kept). Written against vLLM 0.31 (what TRL 1.16 supports; it pins torch 2.13.0) and TRL's colocate code; not
yet run on a GPU: tests/trainer/test_vllm_engine.py checks it against a stand-in for vLLM's ``LLM``.
"""

import atexit
import importlib.util
import os
import shutil
import socket
import tempfile

import torch

from dypo.policy import ModelError, until_eos


def prepare_vllm(config, model, runtime):
    """Where vLLM reads the model: ``--model``, or the embedded model saved whole to a temporary directory (call
    this before sharding). A ModelError first when this machine cannot run vLLM."""
    if runtime.device.type != "cuda":
        raise ModelError("use_vllm true needs CUDA (vLLM runs on GPUs); this machine has none")
    if importlib.util.find_spec("vllm") is None:
        raise ModelError("use_vllm true needs vLLM: pip install 'dypo-kernels[vllm]'")
    if config.model:
        return config.model
    path = tempfile.mkdtemp(prefix="dypo-vllm-model-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    model.save_pretrained(path)
    return path


def start_vllm(config, model_path, codec, runtime, world):
    """This process's VLLMEngine. Call it after sharding: vLLM needs ``vllm_gpu_memory_utilization`` of the GPU
    free when it starts. Every rank calls it (vLLM builds its process groups and checks free memory
    collectively). vLLM seeds Python's, numpy's and torch's global RNGs here."""
    from vllm import LLM

    torch.cuda.empty_cache()
    for name, value in (("RANK", world.rank), ("LOCAL_RANK", world.rank), ("WORLD_SIZE", world.size),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", _free_port())):
        os.environ.setdefault(name, str(value))  # torchrun has set them; a single process has not
    llm = LLM(model=str(model_path), skip_tokenizer_init=True, generation_config="vllm",
              dtype="bfloat16" if runtime.autocast_dtype == torch.bfloat16 else "float32",
              gpu_memory_utilization=config.vllm_gpu_memory_utilization,
              distributed_executor_backend="external_launcher", seed=config.seed + world.rank,
              max_model_len=config.vllm_max_model_length or None,
              max_num_batched_tokens=4096)  # as TRL: the default misleads V1's memory profiler
    return VLLMEngine(llm, codec)


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class VLLMEngine:
    """``sync(model, version)`` then ``generate(prompt_ids, ...)``; ``version`` (the trainer's update count) tells
    whether the weights changed since the last sync."""

    def __init__(self, llm, codec):
        self.llm, self.codec = llm, codec
        self.synced_version = None

    @torch.no_grad()
    def sync(self, model, version):
        """Load the model's current weights into the engine unless ``version`` was loaded last. Every rank calls
        this: a sharded tensor (DTensor) is gathered with a collective."""
        if version == self.synced_version:
            return
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        # parameters, not state_dict(): a tied lm_head.weight sent alone makes vLLM's alias check raise
        for name, tensor in model.named_parameters():
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            engine_model.load_weights([(name, full)])
        self.llm.reset_prefix_cache()
        self.synced_version = version

    def generate(self, prompt_ids, *, max_new_tokens, temperature, greedy=False):
        """Completion token ids of each prompt, through its first EOS (kept), as ``policy.generate``."""
        from vllm import SamplingParams

        params = SamplingParams(n=1, temperature=0.0 if greedy else temperature, top_k=0, top_p=1.0, min_p=0.0,
                                max_tokens=max_new_tokens, stop_token_ids=list(self.codec.eos_ids),
                                detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], sampling_params=params,
                                    use_tqdm=False)
        return [until_eos(output.outputs[0].token_ids, self.codec.eos_ids) for output in outputs]
