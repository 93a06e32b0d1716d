"""Peak extra memory of scoring tokens under torch.no_grad, the trainers' way and the fused way, in a fresh process:
the peak RSS above the inputs, with the allocator pinned to give memory back at once (as tests/memory.py and
benchmarks/cpu_case.py measure the ops).

    python -m tests.integrations.log_prob_memory '{"case": "verl_hook", "N": 4096, "D": 128, "V": 32768}'

Cases: ``verl_hook`` (dypo_log_probs_hook on bf16 [1, N, D] hidden states, as verl's packed batch), ``verl_logits``
(verl's non-fused path: bf16 logits, upcast to fp32, logprobs_from_logits and entropy_from_logits), ``trl_fused``
(fused_per_token_logps on a 1-layer Qwen2 of vocabulary V and width D, 8 rows of N / 8 response tokens after an
8-token prompt; also ``decoder_mb``, the peak of its decoder alone) and ``trl_logits`` (the same model's logits,
then TRL's selective_log_softmax and entropy_from_logits).
"""

import json
import os
import sys

from benchmarks.cpu_case import _rss_kib

MB = 2**20
PROMPT, ROWS, TEMPERATURE = 8, 8, 0.7


def _peak_mb(step):
    """Peak RSS during ``step()`` above the RSS before it, in MiB."""
    with open("/proc/self/clear_refs", "w") as clear:  # reset the peak RSS to the current RSS
        clear.write("5")
    baseline = _rss_kib("VmRSS")
    result = step()
    peak = _rss_kib("VmHWM")
    del result
    return (peak - baseline) / 1024


def _tiny_qwen2(D, V):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        tie_word_embeddings=False)).eval()


def run_case(case, N, D, V):
    import torch

    from dypo_kernels.backend import cpu_extension

    cpu_extension()  # build or load before the baseline
    torch.set_grad_enabled(False)
    generator = torch.Generator().manual_seed(0)
    result = {"case": case, "N": N, "D": D, "V": V}
    if case.startswith("verl"):
        hidden = torch.randn(1, N, D, generator=generator).bfloat16()
        weight = (torch.randn(V, D, generator=generator) / D ** 0.5).bfloat16()
        ids = torch.randint(0, V, (1, N), generator=generator)
        if case == "verl_hook":
            from dypo.integrations.verl import dypo_log_probs_hook

            result["peak_extra_mb"] = _peak_mb(lambda: dypo_log_probs_hook(hidden, weight, ids, TEMPERATURE))
        else:
            from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

            def full_logits():
                logits = (hidden @ weight.T).float() / TEMPERATURE
                return logprobs_from_logits(logits, ids), entropy_from_logits(logits)

            result["peak_extra_mb"] = _peak_mb(full_logits)
        return result
    model = _tiny_qwen2(D, V)
    keep = N // ROWS
    ids = torch.randint(0, V, (ROWS, PROMPT + keep), generator=generator)
    mask = torch.ones_like(ids)
    if case == "trl_fused":
        from dypo.integrations.trl import fused_per_token_logps

        result["decoder_mb"] = _peak_mb(lambda: model.get_decoder()(input_ids=ids, attention_mask=mask,
                                                                    use_cache=False).last_hidden_state)
        result["peak_extra_mb"] = _peak_mb(lambda: fused_per_token_logps(model, ids, mask, keep, TEMPERATURE, True))
    else:
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        def full_logits():
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep + 1,
                           use_cache=False).logits[:, :-1] / TEMPERATURE
            return selective_log_softmax(logits, ids[:, -keep:]), entropy_from_logits(logits)

        result["peak_extra_mb"] = _peak_mb(full_logits)
    return result


def measure(case, chunk_mb=None, **shape):
    """Runs one case in a fresh subprocess (``chunk_mb``: the op's DYPO_KERNELS_CHUNK_BYTES) and returns its
    result dict."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    if chunk_mb is not None:
        env["DYPO_KERNELS_CHUNK_BYTES"] = str(chunk_mb * MB)
    result = subprocess.run([sys.executable, "-m", "tests.integrations.log_prob_memory",
                             json.dumps({"case": case, **shape})], capture_output=True, text=True, env=env, cwd=root)
    if result.returncode:
        raise RuntimeError(f"tests.integrations.log_prob_memory {case} {shape} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run_case(**json.loads(sys.argv[1]))))
