"""--hard_loss sft|kl|sft_kl: the hard prompts' divergence toward teachers along the drawn teacher trajectory,
against a float64 reference with full logits; sft unchanged; the built-in teachers; stored top-k teachers; errors
before any training."""

import json
import math
import random

import pytest
import torch
from safetensors import safe_open

from dypo import policy, pretrain, task, teachers
from dypo.config import Config, parse_config
from dypo.data import DataError, load_problems
from dypo.routing import RoutedGroup, Row
from dypo.train import main
from dypo.trainer import Trainer
from dypo_kernels import Route, dypo_loss
from tests.trainer.test_faults import refused
from tests.trainer.test_train import forced_trainer, four_prompt_trainer

VOCAB = task.CharTokenizer().vocab_size
TINY_RUN = ["--max_steps", "2", "--eval_prompts", "2", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    """Two tiny teachers of the student's vocabulary, with another hidden size than the student's (16, not 64)."""
    root = tmp_path_factory.mktemp("teachers")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = root / f"teacher{seed}"
        policy.tiny_model(Config(hidden_size=16, num_layers=1), VOCAB, "sdpa").save_pretrained(path)
        paths.append(str(path))
    return tuple(paths)


def hard_groups(codec, topk=None):
    """Two hard prompts: one with one teacher solution, one with two (of different lengths)."""
    groups = []
    for g, (prompt, solutions) in enumerate([("12+7=", ["19"]), ("3+4=", ["7", "(4+3)=7"])]):
        ids = codec.prompt_ids(prompt)
        rows = [Row(ids + codec.solution_ids(text), len(ids), teacher_topk=None if topk is None else topk(text))
                for text in solutions]
        groups.append(RoutedGroup(g, 0, int(Route.SFT), rows))
    return groups


def reference_divergence(student, teacher_logps, divergence, aggregate):
    """Per-token divergence in float64 from full log-softmaxes: student [N, V], teachers [m][N, V]; uniform
    weights, jsd's beta 0.5."""
    def kl(log_a, log_b):
        return (log_a.exp() * (log_a - log_b)).sum(-1)

    def one(log_p):
        if divergence == "forward_kl":
            return kl(log_p, student)
        if divergence == "reverse_kl":
            return kl(student, log_p)
        log_m = torch.logaddexp(log_p, student) - math.log(2)
        return 0.5 * kl(log_p, log_m) + 0.5 * kl(student, log_m)

    m = len(teacher_logps)
    if aggregate == "mixture":
        return one(torch.logsumexp(torch.stack(teacher_logps), 0) - math.log(m))
    return sum(one(log_p) for log_p in teacher_logps) / m


def full_logps(model, batch, rows, temperature):
    """log softmax(logits / T) [N, V] in float64 at the positions of ``rows``' solution tokens."""
    logits = model(input_ids=batch["ids"][rows], attention_mask=batch["attention"][rows]).logits[:, :-1]
    return torch.log_softmax(logits[batch["mask"][rows]].double() / temperature, -1)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("aggregate", ["mixture", "mean"])
def test_the_hard_kl_is_the_float64_divergence_of_full_logits(teacher_dirs, divergence, aggregate):
    trainer = Trainer(Config(hard_loss="kl", teacher_models=teacher_dirs, kl_divergence=divergence,
                             kl_aggregate=aggregate, kl_coef=0.7, temperature=1.3))
    batch = trainer.batch(hard_groups(trainer.codec))
    loss, metrics = trainer.loss(batch, alpha=0.5)
    loss.backward()

    student = trainer.model.double()  # the float64 reference: the same parameters, full logits
    student.zero_grad()
    models = [policy.pretrained_model(path, "sdpa").double() for path in teacher_dirs]
    rows = torch.arange(3)
    with torch.no_grad():
        teacher_logps = [full_logps(model, batch, rows, 1.3) for model in models]
    reference = 0.7 * reference_divergence(full_logps(student, batch, rows, 1.3), teacher_logps, divergence,
                                           aggregate).mean()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert metrics["hard_kl"].item() == pytest.approx(reference.item() / 0.7, rel=1e-5)
    assert metrics["loss_sft"] > 0  # reported, weighted 0 under kl


def test_the_gradient_of_the_hard_kl_matches_float64(teacher_dirs):
    """Gradients of two student parameters (the head and the embedding) for the default divergence."""
    trainer = Trainer(Config(hard_loss="kl", teacher_models=teacher_dirs))
    batch = trainer.batch(hard_groups(trainer.codec))
    trainer.loss(batch, alpha=0.5)[0].backward()
    head, embedding = trainer.model.lm_head.weight, trainer.model.get_input_embeddings().weight
    grads = [head.grad.clone(), embedding.grad.clone()]

    student = trainer.model.double()
    student.zero_grad()
    models = [policy.pretrained_model(path, "sdpa").double() for path in teacher_dirs]
    rows = torch.arange(3)
    with torch.no_grad():
        teacher_logps = [full_logps(model, batch, rows, 1.0) for model in models]
    reference = reference_divergence(full_logps(student, batch, rows, 1.0), teacher_logps, "forward_kl", "mixture")
    reference.mean().backward()
    for grad, parameter in zip(grads, (head, embedding)):
        torch.testing.assert_close(grad.double(), parameter.grad, rtol=1e-4, atol=1e-6)


def test_sft_kl_adds_kl_coef_times_the_hard_share_of_the_kl(monkeypatch, teacher_dirs):
    """One easy, one mid and one hard prompt: the hard share is 1/2. The teachers do not move the student's random
    state: both trainers see the same rollouts and log-probs."""
    sft, _ = forced_trainer(monkeypatch).train_step(0)
    both, _ = forced_trainer(monkeypatch, hard_loss="sft_kl", teacher_models=teacher_dirs, kl_coef=0.3).train_step(0)
    assert both["loss_sft"] == sft["loss_sft"] and both["loss_grpo"] == sft["loss_grpo"]
    assert both["hard_kl"] > 0 and "hard_kl" not in sft
    assert both["loss"] == pytest.approx(sft["loss"] + 0.3 * 0.5 * both["hard_kl"], rel=1e-5)


def test_micro_batches_add_up_to_the_whole_hard_kl(monkeypatch, teacher_dirs):
    options = dict(hard_loss="sft_kl", teacher_models=teacher_dirs, sft_teachers="all")
    whole = four_prompt_trainer(monkeypatch, **options)
    whole_metrics, _ = whole.train_step(0)
    parts = four_prompt_trainer(monkeypatch, micro_batch_size=2, **options)
    parts_metrics, _ = parts.train_step(0)  # micro-batches [mid, hard] and [mid]: the second has no hard rows
    for name in ("loss", "loss_sft", "hard_kl"):
        assert parts_metrics[name] == pytest.approx(whole_metrics[name], rel=1e-5), name
    for a, b in zip(whole.model.parameters(), parts.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


def test_hard_loss_sft_is_dypo_loss_as_before(monkeypatch):
    """The default: no teachers, no hard_kl, and the loss of the dypo_loss call the trainer always made."""
    trainer = forced_trainer(monkeypatch, train_batch_size=8)  # the groups stay queued
    trainer.train_step(0)
    assert Config().hard_loss == "sft" and trainer.hard_kl is None
    groups = trainer.queues.pop_batch(8)
    batch = trainer.batch(groups)
    assert "hard" not in batch
    loss, metrics = trainer.loss(batch, 0.5)
    config = trainer.config

    def todays_loss(hidden, weight, bias):  # the trainer's dypo_loss call before --hard_loss existed
        return dypo_loss(
            hidden, weight, batch["targets"], mask=batch["mask"], route=batch["route"], rewards=batch["rewards"],
            group_index=batch["group_index"], advantages=batch["advantages"], old_logps=batch["old_logps"],
            ref_logps=batch["ref_logps"], alpha=0.5, gamma=config.gamma, beta_gal=config.beta_gal,
            beta_kl=config.beta, eps_low=config.epsilon, eps_high=config.epsilon_high, loss_type=config.loss_type,
            bias=bias, temperature=config.temperature, use_bias_correction_kl=config.use_bias_correction_kl,
            entropy_coef=config.entropy_coef, delta=config.delta or None,
            importance_sampling_level=config.importance_sampling_level,
            sapo_temperature_pos=config.sapo_temperature_pos, sapo_temperature_neg=config.sapo_temperature_neg,
            batch_totals=None, return_metrics=True)

    expected, expected_metrics = trainer.policy(batch["ids"], batch["attention"], todays_loss)
    assert torch.equal(loss, expected) and set(metrics) == set(expected_metrics)
    assert "hard_kl" not in metrics


# the built-in teachers --------------------------------------------------------------------------------------------

def test_builtin_teachers_train_once_and_a_resumed_run_reuses_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(teachers.BUILTIN_RECIPE, "steps", 3)  # the real recipe's 400 steps: see docs/trainer.md
    run = tmp_path / "run"
    main([*TINY_RUN, "--hard_loss", "sft_kl", "--teacher_models", "builtin", "--output_dir", str(run)])
    built = sorted((tmp_path / "cache" / "dypo" / "models").glob("teacher-*"))
    assert len(built) == task.TEACHER_STYLES and capsys.readouterr().out.count("built the teacher model") == 2
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["hard_kl_curve"]) == 2 and all(math.isfinite(v) for v in summary["hard_kl_curve"])
    assert all("hard_kl" in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    with safe_open(run / "checkpoint-2" / "model.safetensors", "pt") as saved:  # the student's weights only
        assert set(saved.keys()) == set(policy.tiny_model(Config(), VOCAB, "sdpa").state_dict())
    main(["--resume", str(run), "--max_steps", "3"])
    assert "built the teacher model" not in capsys.readouterr().out
    assert sorted((tmp_path / "cache" / "dypo" / "models").glob("teacher-*")) == built


def test_a_builtin_teacher_is_trained_on_its_own_style(monkeypatch):
    """A few steps of SFT on style 1 ("(b+a)=total") already make it the likelier first token: "("."""
    recipe = {**teachers.builtin_recipes(Config())[1], "steps": 30}
    state = torch.random.get_rng_state()
    model = pretrain.train_tiny(recipe)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is untouched
    codec = policy.CharCodec()
    ids = torch.tensor([codec.prompt_ids("3+4=")])
    with torch.no_grad():
        first = model(input_ids=ids).logits[0, -1].argmax().item()
    assert codec.text([first]) == "("


# stored top-k teachers --------------------------------------------------------------------------------------------

def topk_of(codec, text, k, teachers_count=2, seed=0):
    """Random top-k log-probs of ``teachers_count`` teachers for each token of the solution ``text`` (EOS included),
    with some mass left outside the k tokens when k < V."""
    rng = random.Random(f"{seed}{text}")
    ids, logps = [], []
    for _ in range(teachers_count):
        teacher_ids, teacher_logps = [], []
        for _ in codec.solution_ids(text):
            chosen = rng.sample(range(VOCAB), k)
            weights = [rng.random() + 0.05 for _ in chosen]
            total = sum(weights) / (1.0 if k == VOCAB else 0.9)
            teacher_ids.append(chosen)
            teacher_logps.append([math.log(w / total) for w in weights])
        ids.append(teacher_ids)
        logps.append(teacher_logps)
    return {"ids": ids, "logps": logps}


def test_stored_full_teachers_give_the_float64_mean_of_forward_kls():
    """k = V: the sparse op's bucket is empty and its KL is the full forward KL to each stored distribution."""
    trainer = Trainer(Config(hard_loss="kl", teacher_topk_field="teacher_topk", kl_aggregate="mean",
                             data="unused.jsonl"))
    batch = trainer.batch(hard_groups(trainer.codec, topk=lambda text: topk_of(trainer.codec, text, VOCAB)))
    loss, metrics = trainer.loss(batch, alpha=0.5)
    loss.backward()
    grad = trainer.model.lm_head.weight.grad.clone()

    student = trainer.model.double()
    student.zero_grad()
    stored = [torch.full((3, batch["mask"].shape[1], VOCAB), float("-inf"), dtype=torch.float64) for _ in range(2)]
    for r, row in enumerate(row for group in hard_groups(trainer.codec) for row in group.rows):
        entry = topk_of(trainer.codec, trainer.codec.text(row.ids[row.prompt_length:]), VOCAB)
        for i in range(2):
            for t, (ids, logps) in enumerate(zip(entry["ids"][i], entry["logps"][i])):
                stored[i][r, row.prompt_length - 1 + t, ids] = torch.tensor(logps, dtype=torch.float64)
    teacher_logps = [logps[batch["mask"]] for logps in stored]
    reference = reference_divergence(full_logps(student, batch, torch.arange(3), 1.0), teacher_logps, "forward_kl",
                                     "mean").mean()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert metrics["hard_kl"].item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), student.lm_head.weight.grad, rtol=1e-4, atol=1e-6)


def topk_records(codec, k=3):
    records = []
    for a in range(8):
        solutions = [str(2 * a), f"({a}+{a})={2 * a}"]
        records.append({"prompt": f"{a}+{a}=", "reward_model": {"ground_truth": str(2 * a)}, "target": solutions,
                        "teacher_topk": [topk_of(codec, text, k) for text in solutions]})
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


SPARSE_RUN = [*TINY_RUN, "--hard_loss", "kl", "--teacher_topk_field", "teacher_topk", "--kl_aggregate", "mean",
              "--strategy", "sft", "--num_generations", "2", "--prompts_per_step", "2", "--train_batch_size", "2"]


def test_a_run_on_stored_topk_teachers_logs_the_kl(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", topk_records(policy.CharCodec()))
    run = tmp_path / "run"
    summary = main([*SPARSE_RUN, "--data", str(data), "--output_dir", str(run)])
    assert len(summary["hard_kl_curve"]) == 2 and all(v > 0 for v in summary["hard_kl_curve"])


@pytest.mark.parametrize("damage,message", [
    (lambda r: r.update(teacher_topk=r["teacher_topk"][:1]), "record 2: the teacher top-k must be a list with one "
                                                             "entry per teacher solution (2); got 1"),
    (lambda r: r["teacher_topk"][0].pop("logps"), "record 2: teacher top-k 0 must be an object with ids and logps"),
    (lambda r: r["teacher_topk"][0]["ids"][0][0].__setitem__(1, r["teacher_topk"][0]["ids"][0][0][0]),
     "record 2: teacher top-k 0: ids must be distinct non-negative integers per token"),
    (lambda r: r["teacher_topk"][1]["logps"][0][0].__setitem__(0, 0.5),
     "record 2: teacher top-k 1: logps must be log-probabilities"),
    (lambda r: r["teacher_topk"][1]["ids"][1].pop(), "record 2: teacher top-k 1: ids and logps must be lists"),
    (lambda r: r.update(teacher_topk=[topk_of(policy.CharCodec(), t, 4) for t in r["target"]]),
     "record 2: teacher top-k 0: 2 teachers x k 4; the file's first record has 2 x 3"),
])
def test_a_bad_topk_record_is_named(tmp_path, damage, message):
    records = topk_records(policy.CharCodec())
    damage(records[1])
    with pytest.raises(DataError, match=".*" + message.replace("(", r"\(").replace(")", r"\)")):
        load_problems(write_jsonl(tmp_path / "data.jsonl", records), teacher_topk_field="teacher_topk")


def test_topk_of_the_wrong_length_is_refused_before_any_training(tmp_path, capsys):
    records = topk_records(policy.CharCodec())
    records[3]["teacher_topk"][0] = records[3]["teacher_topk"][1]  # the other solution's 8 tokens
    data = write_jsonl(tmp_path / "data.jsonl", records)
    error = refused([*SPARSE_RUN, "--data", str(data), "--output_dir", str(tmp_path / "run")], capsys)
    assert error.endswith(f"--data {data}: record 4: teacher top-k 0 has 8 tokens per teacher; its solution is 2 "
                          "tokens (EOS included)")
    assert not (tmp_path / "run").exists()


# errors before any training ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--hard_loss", "distill"], "hard_loss must be one of sft, kl, sft_kl; got 'distill'"),
    (["--hard_loss", "kl", "--teacher_models", "builtin", "--kl_divergence", "tvd"],
     "kl_divergence must be one of forward_kl, reverse_kl, jsd; got 'tvd'"),
    (["--hard_loss", "kl", "--teacher_models", "builtin", "--kl_aggregate", "max"],
     "kl_aggregate must be one of mixture, mean; got 'max'"),
    (["--hard_loss", "kl", "--teacher_models", "builtin", "--kl_coef", "-1"], "kl_coef must be >= 0; got -1.0"),
    (["--hard_loss", "kl", "--teacher_models", "builtin", "--kl_coef", "nan"], "kl_coef must be a finite number"),
    (["--hard_loss", "kl"], "hard_loss kl needs a teacher source: --teacher_models DIR [DIR ...] (or builtin) or "
                            "--teacher_topk_field NAME"),
    (["--hard_loss", "sft_kl", "--teacher_models", "builtin", "--teacher_topk_field", "topk"],
     "teacher_models and teacher_topk_field exclude each other: give one teacher source"),
    (["--teacher_models", "builtin"], "teacher_models is used by hard_loss kl or sft_kl only; got hard_loss sft"),
    (["--hard_loss", "kl", "--teacher_models", "builtin", "--strategy", "grpo"],
     "hard_loss kl trains the hard prompts' teacher trajectories by SFT; strategy grpo has none"),
    (["--hard_loss", "kl", "--teacher_models", "builtin", "t2"], "teacher_models builtin stands alone"),
    (["--hard_loss", "kl", "--teacher_topk_field", "topk"], "teacher_topk_field needs data"),
    (["--hard_loss", "kl", "--teacher_topk_field", "topk", "--data", "d.jsonl"],
     "teacher_topk_field gives the mean of forward KLs to the stored teachers (fused_sparse_teacher_kl): it needs "
     "kl_divergence forward_kl and kl_aggregate mean; got forward_kl, mixture"),
])
def test_bad_teacher_options_are_one_line_errors(argv, message, tmp_path, capsys):
    error = refused([*argv, "--output_dir", str(tmp_path / "run")], capsys)
    assert error.endswith(message) or message in error
    assert not (tmp_path / "run").exists()


def test_teachers_of_another_vocabulary_are_refused_before_any_training(tmp_path, capsys):
    other = tmp_path / "other"
    policy.tiny_model(Config(hidden_size=16, num_layers=1), VOCAB + 2, "sdpa").save_pretrained(other)
    argv = [*TINY_RUN, "--hard_loss", "kl", "--output_dir", str(tmp_path / "run"), "--teacher_models"]
    error = refused([*argv, str(other)], capsys)
    assert error.endswith(f"--teacher_models {other}: its vocabulary has {VOCAB + 2} tokens, the student's {VOCAB}; "
                          "the teachers must share the student's vocabulary")
    error = refused([*argv, str(tmp_path / "missing")], capsys)
    assert error.endswith(f"--teacher_models {tmp_path / 'missing'}: not a Hugging Face model directory (no "
                          "config.json there); nothing is downloaded, give a local directory")
    assert not (tmp_path / "run").exists()


def test_teacher_options_from_yaml_and_on_resume(tmp_path, teacher_dirs):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"hard_loss: sft_kl\nkl_divergence: jsd\nteacher_models: [{teacher_dirs[0]}, "
                           f"{teacher_dirs[1]}]\n")
    config, _, _ = parse_config(["--config", str(config_file)])
    assert (config.hard_loss, config.kl_divergence, config.teacher_models) == ("sft_kl", "jsd", teacher_dirs)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"hard_loss": "kl", "teacher_models": list(teacher_dirs)}))
    config, _, _ = parse_config(["--resume", str(run), "--teacher_models", *teacher_dirs])  # the same: allowed
    assert config.teacher_models == teacher_dirs
