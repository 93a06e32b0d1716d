"""--use_vllm on CPU: the engine's side of the contract, against a stand-in for vLLM's LLM (vLLM itself needs CUDA).
The stand-in offers what dypo/vllm_engine.py calls, with the names vLLM 0.31 gives them, and samples from its own
copy of the policy, which only load_weights changes: so the trainer's rollouts show whether the weights reached it."""

import copy
import dataclasses
import sys
import types

import pytest
import torch

from dypo import policy
from dypo.config import Config
from dypo.train import main
from dypo.trainer import Trainer
from dypo.vllm_engine import VLLMEngine


@dataclasses.dataclass
class SamplingParams:
    """The vllm.SamplingParams fields dypo uses (vLLM 0.31 names; an unknown keyword is a TypeError)."""

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_tokens: int = 16
    stop_token_ids: list = None
    detokenize: bool = True


class StandInLLM:
    def __init__(self, live_model, codec, trainer_updates=lambda: None):
        self.live_model, self.codec, self.trainer_updates = live_model, codec, trainer_updates
        self.copy = copy.deepcopy(live_model)
        with torch.no_grad():
            for parameter in self.copy.parameters():
                parameter.add_(1.0)  # a copy that was never synced samples differently and fails the checks
        runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self.load_weights))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=runner)))
        self.loaded_names, self.prefix_resets, self.calls = [], 0, []

    def load_weights(self, weights):
        state = self.copy.state_dict()
        for name, tensor in weights:
            state[name].copy_(tensor)
            self.loaded_names.append(name)

    def reset_prefix_cache(self):
        self.prefix_resets += 1

    def generate(self, prompts, sampling_params, use_tqdm):
        assert use_tqdm is False and all(set(prompt) == {"prompt_token_ids"} for prompt in prompts)
        stale = max((a - b).abs().max().item() for a, b in zip(self.copy.parameters(), self.live_model.parameters()))
        self.calls.append((len(prompts), sampling_params, stale, self.trainer_updates()))
        greedy = sampling_params.temperature == 0
        completions = policy.generate(self.copy, self.codec, policy.Runtime(torch.device("cpu")),
                                      [prompt["prompt_token_ids"] for prompt in prompts],
                                      max_new_tokens=sampling_params.max_tokens,
                                      temperature=1.0 if greedy else sampling_params.temperature, greedy=greedy)
        return [outputs(ids) for ids in completions]


def outputs(token_ids):
    """One vllm.RequestOutput as dypo reads it."""
    return types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tuple(token_ids))])


@pytest.fixture
def stand_in_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=SamplingParams))
    engines = []

    def start(config, model, codec, runtime, world):  # the stand-in reads the live model where vLLM reads a path
        engines.append(VLLMEngine(StandInLLM(model, codec), codec))
        return engines[-1]

    monkeypatch.setattr("dypo.trainer.prepare_vllm", lambda config, model, runtime: model)
    monkeypatch.setattr("dypo.trainer.start_vllm", start)
    return engines


def test_engine_maps_sampling_and_cuts_at_eos(stand_in_vllm):
    trainer = Trainer(Config(use_vllm="true", num_generations=2, prompts_per_step=2, max_new_tokens=6))
    engine, = stand_in_vllm
    prompts = [trainer.codec.prompt_ids("1+2="), trainer.codec.prompt_ids("3+4=")]
    sampled = trainer.completions(prompts, temperature=0.7)
    greedy = trainer.completions(prompts, temperature=1.0, greedy=True)
    (_, sampling, stale, _), (_, greedy_params, _, _) = engine.llm.calls
    assert sampling == SamplingParams(n=1, temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, max_tokens=6,
                                      stop_token_ids=trainer.codec.eos_ids, detokenize=False)
    assert greedy_params.temperature == 0.0 and stale == 0
    assert greedy == policy.generate(trainer.model, trainer.codec, trainer.runtime, prompts, max_new_tokens=6,
                                     temperature=1.0, greedy=True)
    assert len(sampled) == 2 and all(len(completion) <= 6 for completion in sampled)
    assert engine.llm.prefix_resets == 1  # one load: no update in between
    assert engine.llm.loaded_names == [name for name, _ in trainer.model.named_parameters()]
    assert trainer.completions([], temperature=1.0) == [] and len(engine.llm.calls) == 2
    eos = trainer.codec.eos_ids[0]
    engine.llm.generate = lambda prompts, sampling_params, use_tqdm: [outputs([5, eos, 7]), outputs([5, 6])]
    assert engine.generate(prompts, max_new_tokens=6, temperature=1.0) == [[5, eos], [5, 6]]


def test_training_with_vllm_samples_from_the_weights_of_the_latest_update(stand_in_vllm):
    trainer = Trainer(Config(use_vllm="true", max_steps=4, num_generations=4, prompts_per_step=4,
                             train_batch_size=2, max_new_tokens=8, eval_prompts=4))
    engine, = stand_in_vllm
    engine.llm.trainer_updates = lambda: trainer.updates
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for step in range(3):
        trainer.train_step(step)
    trainer.evaluate(trainer.source.next(3))
    assert trainer.updates > 0 and any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    rollouts = [call for call in engine.llm.calls if call[1].temperature != 0]
    assert [count for count, *_ in rollouts] == [16, 16, 16]
    assert all(stale == 0 for _, _, stale, _ in engine.llm.calls)  # every generation saw the current weights
    versions = [updates for *_, updates in engine.llm.calls]
    assert engine.llm.prefix_resets == len(set(versions))  # one load per update count seen


def test_a_tied_head_is_sent_once(stand_in_vllm):
    """vLLM ties lm_head to the embedding; a lone lm_head.weight would fail its alias check."""
    trainer = Trainer(Config(use_vllm="true", num_generations=2, prompts_per_step=2, max_new_tokens=4))
    engine, = stand_in_vllm
    trainer.model.lm_head.weight = trainer.model.model.embed_tokens.weight
    engine.sync(trainer.model, version="tied")
    assert "lm_head.weight" not in engine.llm.loaded_names[-len(list(trainer.model.parameters())):]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_use_vllm_without_cuda_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--use_vllm", "true", "--output_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        "use_vllm true needs CUDA (vLLM runs on GPUs); this machine has none")
