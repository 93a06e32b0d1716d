"""python tests/trainer/forced_rollouts.py [dypo.train options], alone or under torchrun: the trainer with
rollouts fixed by the prompt instead of sampled, so that one process and several see the same data. For 'a+b=' the
first (3a + b) mod 9 of the 8 rollouts are right: groups of every grade, so some steps route fewer prompts than a
batch and the queue carries groups over. Each rank writes the SHA-256 of
the full trained parameters to OUTPUT_DIR/params-rank<r>.sha256."""

import hashlib
import sys
from pathlib import Path

import torch

import dypo.policy
import dypo.run
import dypo.train


def forced_generate(model, codec, runtime, prompt_ids, *, max_new_tokens, temperature, greedy=False, batch_size=0):
    completions, seen = [], {}
    for ids in prompt_ids:
        prompt = codec.text(ids)
        a, *rest = (int(n) for n in prompt.replace(" ", "").rstrip("=").split("+"))  # the OOD sets' prompts too
        b = sum(rest)
        j = seen[prompt] = seen.get(prompt, -1) + 1
        right = j % 8 < (3 * a + b) % 9
        completions.append(codec.solution_ids(str(a + b if right else a + b + 1)))
    return completions


if __name__ == "__main__":
    dypo.policy.generate = forced_generate
    finish = dypo.run._finish

    def finish_and_hash(config, out, history, accuracy, sets, eval_prompts, trainer):
        digest = hashlib.sha256()
        for name, parameter in sorted(trainer.policy.named_parameters()):  # each rank gathers every shard itself
            full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
            digest.update(name.encode() + full.detach().cpu().float().numpy().tobytes())
        Path(out, f"params-rank{trainer.world.rank}.sha256").write_text(digest.hexdigest())
        return finish(config, out, history, accuracy, sets, eval_prompts, trainer)

    dypo.run._finish = finish_and_hash
    torch.set_num_threads(1)
    dypo.train.main(sys.argv[1:])
