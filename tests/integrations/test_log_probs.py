"""The old and reference log-probs of TRL's GRPOTrainer and verl's actor through fused_linear_logprobs
(dypo.integrations.trl.fused_logps_method / patch_trl_log_probs, dypo.integrations.verl.dypo_log_probs_hook /
patch_verl_log_probs): the values of the trainers' own paths, their fallbacks, and no [tokens, vocab] logits (peak
memory measured in a fresh process by tests/integrations/log_prob_memory.py)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from dypo.integrations import trl as trl_adapter  # noqa: E402
from dypo.integrations.trl import (  # noqa: E402
    DYPOTrainer,
    fused_path_refusal,
    fused_per_token_logps,
    patch_trl_log_probs,
)
from tests.integrations.log_prob_memory import measure  # noqa: E402
from tests.integrations.test_trl import right_answer  # noqa: E402
from tests.tiny_models import save_tiny_qwen2  # noqa: E402

HAS_VERL = importlib.util.find_spec("verl") is not None
needs_verl = pytest.mark.skipif(not HAS_VERL, reason="verl is installed by `make test` (Makefile)")
TRLS_OWN = GRPOTrainer._get_per_token_logps_and_entropies
# fp32: the fused op and the trainers' own paths agree to rounding; bf16: to bf16's resolution of the logits
FP32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=1.6e-2, atol=5e-3)


def tiny_trainer(tmp_path, trainer_class=DYPOTrainer, temperature=1.0, dtype=None, peft_config=None, **settings):
    """The trainer of tests/integrations/test_trl.py's fixture (tiny Qwen2 on CPU, beta > 0: a reference model)."""
    model_dir = save_tiny_qwen2(tmp_path / "model")
    rows = [{"prompt": f"{a}+{b}=", "ground_truth": str(a + b), "target": [f"{a + b}"]} for a in range(3)
            for b in range(3)]
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=4, max_steps=1, learning_rate=1e-2, report_to="none", use_cpu=True,
                      bf16=False, seed=0, save_strategy="no", beta=0.04, temperature=temperature,
                      model_init_kwargs=None if dtype is None else {"dtype": dtype}, **settings)
    return trainer_class(model=str(model_dir), reward_funcs=right_answer, args=args,
                         train_dataset=Dataset.from_list(rows), peft_config=peft_config)


def scored_batch(rows=5, prompt=4, completion=5, seed=0):
    """prompt + completion ids with left-padded prompts and right-padded completions, as TRL builds them."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 40, (rows, prompt + completion), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[1, -3:] = 0
    mask[2, -1] = 0
    mask[3, prompt + 1:] = 0
    return ids, mask, completion


def reference_logps(model, ids, mask, keep, temperature):
    """float64 log-probs and entropies of the full logits lm_head(last hidden state) / T, 0 where mask is 0."""
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        head = model.get_output_embeddings()
        logits = hidden[:, -keep - 1:-1].double() @ head.weight.double().T / temperature
    log_p = logits.log_softmax(-1)
    keep_mask = mask[:, -keep:]
    logps = log_p.gather(-1, ids[:, -keep:, None])[..., 0] * keep_mask
    entropy = -(log_p.exp() * log_p).sum(-1) * keep_mask
    return logps, entropy


def count_fused_calls(monkeypatch, module):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    original = module.fused_linear_logprobs
    monkeypatch.setattr(module, "fused_linear_logprobs", counting)
    return calls


# TRL ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_old_and_ref_logps_are_trls_own(tmp_path, monkeypatch, temperature, dtype):
    """DYPOTrainer's _get_per_token_logps_and_entropies under no_grad, as TRL's generation step calls it (policy
    with and without entropies, reference model without, batch_size chunks of 2 over 5 rows), against TRL 1.16's
    own method on the same trainer, model and batch, and against float64 full logits: same shapes, dtypes, zeros
    at padding, None where TRL gives None."""
    trainer = tiny_trainer(tmp_path, temperature=temperature, dtype=dtype)
    calls = count_fused_calls(monkeypatch, trl_adapter)
    ids, mask, keep = scored_batch()
    tolerance = FP32 if dtype is None else BF16
    for model, entropy in ((trainer.model, True), (trainer.model, False), (trainer.ref_model, False)):
        with torch.no_grad():
            ours = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep, batch_size=2,
                                                              compute_entropy=entropy)
            trls = TRLS_OWN(trainer, model, ids, mask, keep, batch_size=2, compute_entropy=entropy)
        expected_logps, expected_entropy = reference_logps(model, ids, mask, keep, temperature)
        assert ours[0].shape == trls[0].shape == (5, keep) and ours[0].dtype == trls[0].dtype == torch.float32
        assert ours[2] is None and trls[2] is None
        torch.testing.assert_close(ours[0], trls[0], **tolerance)
        torch.testing.assert_close(ours[0], expected_logps.float(), **tolerance)
        assert bool((ours[0][mask[:, -keep:] == 0] == 0).all())
        if entropy:
            assert ours[1].dtype == trls[1].dtype == torch.float32
            torch.testing.assert_close(ours[1], trls[1], **tolerance)
            torch.testing.assert_close(ours[1], expected_entropy.float(), **tolerance)
        else:
            assert ours[1] is None and trls[1] is None
    assert len(calls) == 3 * 3  # three calls of three batch_size chunks, all fused


def test_fused_per_token_logps_is_the_reusable_function(tmp_path):
    trainer = tiny_trainer(tmp_path, temperature=0.7)
    ids, mask, keep = scored_batch()
    logps, entropy = fused_per_token_logps(trainer.model, ids, mask, keep, 0.7, True)
    expected_logps, expected_entropy = reference_logps(trainer.model, ids, mask, keep, 0.7)
    torch.testing.assert_close(logps, expected_logps.float(), **FP32)
    torch.testing.assert_close(entropy, expected_entropy.float(), **FP32)
    fp32_head, _ = fused_per_token_logps(trainer.model, ids, mask, keep, 0.7, batch_size=3, cast_lm_head_to_fp32=True)
    torch.testing.assert_close(fp32_head, logps, **FP32)
    with pytest.raises(ValueError, match="logits_to_keep"):
        fused_per_token_logps(trainer.model, ids, mask, ids.size(1), 0.7)


def test_trls_own_path_where_the_fused_one_cannot_honour_the_call(tmp_path, monkeypatch):
    """With gradients on (TRL's policy loss) the call is TRL's, differentiable; the other refusals by reason."""
    trainer = tiny_trainer(tmp_path)
    calls = count_fused_calls(monkeypatch, trl_adapter)
    ids, mask, keep = scored_batch()
    with torch.enable_grad():
        logps, entropy, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep,
                                                                       compute_entropy=True)
    assert logps.grad_fn is not None and not calls
    with torch.no_grad():
        torch.testing.assert_close(logps, TRLS_OWN(trainer, trainer.model, ids, mask, keep)[0])
        refusal = fused_path_refusal
        assert refusal(trainer, trainer.model, ids, keep) is None
        assert "MoE" in refusal(trainer, trainer.model, ids, keep, compute_aux_loss=True)
        assert "pixel_values" in refusal(trainer, trainer.model, ids, keep, pixel_values=torch.zeros(1),
                                         image_grid_thw=None)
        assert "whole sequence" in refusal(trainer, trainer.model, ids, ids.size(1))
        monkeypatch.setattr(trainer.model.config, "final_logit_softcapping", 30.0, raising=False)
        assert "soft-capped" in refusal(trainer, trainer.model, ids, keep)
        monkeypatch.setattr(trainer.model.config, "final_logit_softcapping", None)
        monkeypatch.setattr(trainer.model.config, "logit_scale", 0.25, raising=False)
        assert "scaled" in refusal(trainer, trainer.model, ids, keep)


def test_one_line_patch_of_a_plain_grpo_trainer(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path, trainer_class=GRPOTrainer, temperature=0.7)
    ids, mask, keep = scored_batch()
    with torch.no_grad():
        before = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep, compute_entropy=True)
        assert patch_trl_log_probs(trainer) is trainer
        patch_trl_log_probs(trainer)  # twice: nothing more
        calls = count_fused_calls(monkeypatch, trl_adapter)
        after = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep, compute_entropy=True)
    assert len(calls) == 1
    torch.testing.assert_close(after[0], before[0], **FP32)
    torch.testing.assert_close(after[1], before[1], **FP32)
    assert not getattr(GRPOTrainer._get_per_token_logps_and_entropies, "dypo_fused", False)  # only this trainer
    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", TRLS_OWN)  # restored after the test
    patch_trl_log_probs()
    assert GRPOTrainer._get_per_token_logps_and_entropies.dypo_fused
    assert GRPOTrainer._get_per_token_logps_and_entropies.__wrapped__ is TRLS_OWN


def test_lora_policy_and_its_base_as_reference(tmp_path):
    """With a PEFT adapter TRL has no reference model: the reference log-probs are the policy's with the adapter
    disabled (TRL's use_adapter). Both, fused, are TRL's own."""
    peft = pytest.importorskip("peft")
    from trl.trainer.utils import use_adapter

    trainer = tiny_trainer(tmp_path, peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
    assert trainer.ref_model is None
    ids, mask, keep = scored_batch()
    with torch.no_grad():
        policy = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)[0]
        torch.testing.assert_close(policy, TRLS_OWN(trainer, trainer.model, ids, mask, keep)[0], **FP32)
        with use_adapter(trainer.model, adapter_name=None):
            base = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)[0]
            torch.testing.assert_close(base, TRLS_OWN(trainer, trainer.model, ids, mask, keep)[0], **FP32)
    assert (policy - base).abs().max() > 1e-2  # the adapter changes the log-probs: the two are not one path


def test_a_training_step_scores_old_and_ref_logps_through_the_op(tmp_path, monkeypatch):
    """steps_per_generation > gradient_accumulation_steps: TRL computes old log-probs; beta > 0: reference ones."""
    trainer = tiny_trainer(tmp_path, steps_per_generation=2)
    calls = count_fused_calls(monkeypatch, trl_adapter)
    trainer.train()
    assert len(calls) >= 2


# verl -----------------------------------------------------------------------------------------------------------
@pytest.fixture
def verl_functions():
    if not HAS_VERL:
        pytest.skip("verl is installed by `make test` (Makefile), not by the test extra")
    from verl.utils.experimental.torch_functional import FusedLinearForPPO
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    from dypo.integrations import verl as verl_adapter

    yield verl_adapter, FusedLinearForPPO, logprobs_from_logits, entropy_from_logits
    verl_adapter.unpatch_verl_log_probs()


def head_inputs(shape, D=24, V=300, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, D, generator=generator)
    weight = torch.randn(V, D, generator=generator) / D ** 0.5 * 2
    ids = torch.randint(0, V, shape, generator=generator)
    return hidden.to(dtype), weight.to(dtype), ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 37), (3, 11), (29,)], ids=["packed", "padded", "flat"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_verl_hook_is_verls_own_log_probs(verl_functions, dtype, shape, temperature):
    """dypo_log_probs_hook against verl's FusedLinearForPPO (torch backend, what use_fused_kernels runs) and its
    non-fused logprobs_from_logits / entropy_from_logits on the full logits, on the same inputs; and against float64.
    bf16: verl rounds each logit to bf16 (up to 2^-9 |z|), so the two agree to 2^-8 max|z| plus the entropies'
    bf16 rounding (both return them in bf16); the hook's log-probs, fp32-accumulated, to float64's within 1e-5."""
    verl_adapter, FusedLinearForPPO, logprobs_from_logits, entropy_from_logits = verl_functions
    hidden, weight, ids = head_inputs(shape, dtype=dtype)
    with torch.no_grad():
        log_probs, entropy = verl_adapter.dypo_log_probs_hook(hidden, weight, ids, temperature)
        fused_log_probs, fused_entropy = FusedLinearForPPO().forward(hidden, weight, ids, temperature)
        logits = (hidden @ weight.T).float() / temperature  # verl's logits, in the model's dtype
        own_log_probs, own_entropy = logprobs_from_logits(logits, ids), entropy_from_logits(logits)
        exact = hidden.double() @ weight.double().T / temperature
        exact_log_probs = exact.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
        exact_entropy = -(exact.softmax(-1) * exact.log_softmax(-1)).sum(-1)
    assert log_probs.shape == entropy.shape == ids.shape
    assert (log_probs.dtype, entropy.dtype) == (fused_log_probs.dtype, fused_entropy.dtype) == (torch.float32, dtype)
    if dtype == torch.float32:
        tolerance = rounding = FP32
    else:
        tolerance = dict(rtol=2**-7, atol=2**-8 * exact.abs().max().item())
        rounding = dict(rtol=2**-8, atol=1e-5)
    for ours, verls in ((log_probs, fused_log_probs), (entropy, fused_entropy), (log_probs, own_log_probs),
                        (entropy, own_entropy)):
        torch.testing.assert_close(ours.float(), verls.float(), **tolerance)
    torch.testing.assert_close(log_probs.double(), exact_log_probs, **FP32)
    torch.testing.assert_close(entropy.double(), exact_entropy, check_dtype=False, **rounding)


def test_verl_hook_gradients_are_verls(verl_functions):
    """verl's actor update calls the fused path with gradients: the hook's match FusedLinearForPPO's (fp32)."""
    verl_adapter, FusedLinearForPPO, _, _ = verl_functions
    hidden, weight, ids = head_inputs((2, 13))
    weights = torch.randn(2, 13, generator=torch.Generator().manual_seed(1))
    grads = []
    for function in (verl_adapter.dypo_log_probs_hook, FusedLinearForPPO().forward):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        log_probs, entropy = function(h, w, ids, 0.8)
        grads.append(torch.autograd.grad((log_probs * weights).sum() + (entropy * weights.flip(0)).sum(), [h, w]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_patch_routes_verls_model_forwards_through_the_hook(verl_functions, tmp_path, monkeypatch):
    """verl's own HF forwards for use_fused_kernels (verl.models.transformers.dense_common, torch and triton
    backends) on a tiny Qwen2, before and after patch_verl_log_probs: the same log-probs and entropies, the hook
    called; the triton one, which needs CUDA unpatched, runs on CPU through the hook. unpatch gives verl's back."""
    verl_adapter, FusedLinearForPPO, logprobs_from_logits, entropy_from_logits = verl_functions
    from transformers import AutoModelForCausalLM
    from verl.models.transformers.dense_common import forward_with_torch_backend, forward_with_triton_backend
    from verl.utils.experimental import torch_functional
    from verl.utils.kernel import linear_cross_entropy

    model = AutoModelForCausalLM.from_pretrained(save_tiny_qwen2(tmp_path / "model"))
    ids = torch.randint(4, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), return_dict=True, temperature=0.7)
    calls = count_fused_calls(monkeypatch, verl_adapter)
    verls_kernel = linear_cross_entropy.linear_cross_entropy
    with torch.no_grad():
        verls = forward_with_torch_backend(model, **inputs)
        logits = model(input_ids=ids).logits.float() / 0.7
        rolled = torch.roll(ids, -1, dims=-1)
        expected = logprobs_from_logits(logits, rolled), entropy_from_logits(logits)
        verl_adapter.patch_verl_log_probs()
        verl_adapter.patch_verl_log_probs()  # twice: nothing more
        assert torch_functional.FusedLinearForPPO is verl_adapter.DYPOFusedLinearForPPO
        assert linear_cross_entropy.linear_cross_entropy is verl_adapter.dypo_linear_cross_entropy
        ours = forward_with_torch_backend(model, **inputs)
        ours_triton = forward_with_triton_backend(model, **inputs)
    assert len(calls) == 2
    torch.testing.assert_close(ours.log_probs, verls.log_probs, **FP32)
    torch.testing.assert_close(ours.entropy, verls.entropy, **FP32)
    torch.testing.assert_close(ours.log_probs, expected[0], **FP32)
    assert ours_triton.log_probs.shape == (ids.numel(),)  # verl's kernel returns flat tokens
    torch.testing.assert_close(ours_triton.log_probs.view(ids.shape), expected[0], **FP32)
    torch.testing.assert_close(ours_triton.entropy.view(ids.shape), expected[1], **FP32)
    verl_adapter.unpatch_verl_log_probs()
    assert torch_functional.FusedLinearForPPO is FusedLinearForPPO
    assert linear_cross_entropy.linear_cross_entropy is verls_kernel


def test_linear_cross_entropy_keeps_verls_kernel_where_the_hook_cannot(verl_functions, monkeypatch):
    verl_adapter = verl_functions[0]
    from verl.utils.kernel.linear_cross_entropy import LinearCrossEntropy

    monkeypatch.setattr(LinearCrossEntropy, "apply", lambda *args: ("verl's", args[4]))
    hidden, weight, ids = head_inputs((7,))
    assert verl_adapter.dypo_linear_cross_entropy(hidden, weight, ids, 1.0, "mean") == ("verl's", "mean")
    log_probs, entropy = verl_adapter.dypo_linear_cross_entropy(hidden, weight, ids, 1.0, "none")
    assert log_probs.shape == entropy.shape == (7,)


@needs_verl
def test_the_environment_variable_installs_the_hook_where_verl_loads_the_plugin():
    probe = ("import verl; from verl.utils.experimental import torch_functional as f; "
             "from verl.utils.kernel import linear_cross_entropy as l; "
             "print(f.FusedLinearForPPO.__name__, l.linear_cross_entropy.__name__)")
    env = dict(os.environ, DYPO_VERL_LOG_PROBS="1", VERL_USE_EXTERNAL_PLUGINS="auto")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.split() == ["DYPOFusedLinearForPPO", "dypo_linear_cross_entropy"]


# memory ---------------------------------------------------------------------------------------------------------
MB = 2**20
CHUNK_MB = 32  # the op's chunk budget in the probe (DYPO_KERNELS_CHUNK_BYTES); CPU's default is 128 MiB


def contract_mb(N, D, V):
    """O(N*D + V*D + chunk): a few fp32 copies of the hidden states and the weight, one chunk budget, and the
    allocator's and the outputs' slack."""
    return 4 * (N * D + V * D) * 4 / MB + 1.5 * CHUNK_MB + 16


@needs_verl
def test_verl_hook_scores_without_the_logits():
    """8 x 4,096 response tokens of a 151,936-token vocabulary would be 10.0 GB of bf16 logits plus 19.9 GB of
    their fp32 softmax. At 4,096 tokens x 32,768 (bf16: 256 MiB logits, 512 MiB fp32): verl's full-logit path
    peaks above bf16 logits + fp32 softmax; the hook within the contract, flat in N (4x the tokens add < 10% of
    their logits)."""
    D, V = 128, 32768
    small, large = (measure("verl_hook", N=n, D=D, V=V, chunk_mb=CHUNK_MB) for n in (1024, 4096))
    full = measure("verl_logits", N=4096, D=D, V=V)
    logits_mb = 4096 * V * (2 + 4) / MB
    assert full["peak_extra_mb"] > logits_mb, full
    assert large["peak_extra_mb"] < contract_mb(4096, D, V) < 0.25 * logits_mb, large
    assert large["peak_extra_mb"] - small["peak_extra_mb"] < 0.1 * 3072 * V * 4 / MB, (small, large)


def test_trl_fused_logps_scores_without_the_logits():
    """fused_per_token_logps on a 1-layer Qwen2 with a 32,768-token vocabulary, 8 x 512 response tokens: within
    the contract above the decoder's own activations; the full-logit path (model logits, then TRL's
    selective_log_softmax and entropy_from_logits) above the fp32 logits."""
    D, V = 64, 32768
    fused = measure("trl_fused", N=4096, D=D, V=V, chunk_mb=CHUNK_MB)
    full = measure("trl_logits", N=4096, D=D, V=V)
    logits_mb = 4096 * V * 4 / MB
    assert full["peak_extra_mb"] > logits_mb, full
    # the measured peak under the contract plus the decoder's own activations, and far under the logits (the bound
    # itself holds a measured term, so it is not compared with the logits)
    assert fused["peak_extra_mb"] < contract_mb(4096, D, V) + fused["decoder_mb"], fused
    assert fused["peak_extra_mb"] < 0.25 * logits_mb, fused
