import json

import pytest

from dypo.config import Config, parse_config
from dypo.train import main


def test_defaults_then_yaml_then_options(tmp_path):
    config, resume, overwrite = parse_config([])
    assert config == Config() and resume is None and not overwrite
    config_file = tmp_path / "run.yaml"
    config_file.write_text("alpha: 0.25\nmax_steps: 7\nsft_teachers: all\n")
    config, _, _ = parse_config(["--config", str(config_file), "--max_steps", "9"])
    assert (config.alpha, config.max_steps, config.sft_teachers) == (0.25, 9, "all")  # the command line wins
    config_file.write_text("bf16: false\nuse_liger_kernel: true\n")  # YAML booleans for the switches
    config, _, _ = parse_config(["--config", str(config_file)])
    assert (config.bf16, config.use_liger_kernel) == ("false", "true")


def test_resume_takes_the_saved_config_and_only_run_length_and_logging_overrides(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"alpha": 0.3, "max_steps": 5, "output_dir": "elsewhere"}))
    config, resume, _ = parse_config(["--resume", str(run), "--max_steps", "8", "--alpha", "0.3"])
    assert (config.alpha, config.max_steps, config.output_dir, resume) == (0.3, 8, str(run), run)
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--resume", str(run), "--alpha", "0.4"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "alpha cannot change (only max_steps, logging_steps" in error


def test_an_existing_run_directory_needs_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    main(["--max_steps", "1", "--eval_prompts", "2", "--output_dir", str(run)])
    with pytest.raises(SystemExit) as exit_info:
        main(["--max_steps", "1", "--output_dir", str(run)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--resume {run} continues it" in error
    (run / "checkpoint-7").mkdir()  # stale files of the earlier run go
    summary = main(["--max_steps", "2", "--eval_prompts", "2", "--output_dir", str(run), "--overwrite_output_dir"])
    assert summary["steps"] == 2 and sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]


@pytest.mark.parametrize("argv,message", [
    (["--strategy", "ppo"], "strategy must be one of dypo, grpo, sft, sft_then_rl, sft_rl, luffy; got 'ppo'"),
    (["--alpha", "2"], "alpha must lie in [0, 1]"),
    (["--loss_type", "ppo"], "loss_type must be one of grpo, bnpo, dapo, dr_grpo, cispo, sapo, luspo"),
    (["--loss_type", "sapo", "--delta", "1.5"], "delta caps the ratio of the clipped objective"),
    (["--sapo_temperature_pos", "0"], "sapo_temperature_pos must be positive"),
    (["--delta", "-1"], "delta must be >= 0"),
    (["--importance_sampling_level", "sentence"], "importance_sampling_level must be one of token, sequence"),
    (["--loss_type", "cispo", "--importance_sampling_level", "sequence"], "importance_sampling_level sequence is not"),
    (["--scale_rewards", "std"], "scale_rewards must be one of group, batch, none"),
    (["--max_steps", "0"], "max_steps must be a positive integer"),
    (["--epsilon", "1"], "epsilon must lie in [0, 1)"),
    (["--reward", "no_colon"], "reward must look like module:function"),
    (["--bf16", "yes"], "bf16 must be one of auto, true, false"),
    (["--gamma", "nan"], "gamma must be a finite number"),
    (["--learning_rate", "inf"], "learning_rate must be a finite number"),
    (["--max_grad_norm", "0"], "max_grad_norm must be positive"),
    (["--eval_data", "e.jsonl"], "eval_data needs data"),
    (["--learning_rate", "fast"], "argument --learning_rate: invalid float value"),
    (["--no_such_option", "1"], "unrecognized arguments"),
    (["--resume", "/no/such/run"], "--resume /no/such/run: no run directory there"),
    (["--use_vllm", "auto"], "use_vllm must be one of true, false; got 'auto'"),
    (["--use_bias_correction_kl", "yes"], "use_bias_correction_kl must be one of true, false; got 'yes'"),
    (["--vllm_gpu_memory_utilization", "0"], "vllm_gpu_memory_utilization must lie in (0, 1]"),
    (["--vllm_gpu_memory_utilization", "1.5"], "vllm_gpu_memory_utilization must lie in (0, 1]"),
    (["--vllm_max_model_length", "-1"], "vllm_max_model_length must be >= 0"),
    (["--use_vllm", "true", "--temperature", "3"], "temperature must lie in [0.01, 2] with use_vllm true"),
    (["--hidden_size", "3"], "hidden_size must be a multiple of 8 for the embedded model (4 attention heads, each "
                             "of an even size for rotary positions); got 3"),
    (["--hidden_size", "12"], "hidden_size must be a multiple of 8"),
    (["--max_step", "3"], "unrecognized arguments: --max_step 3"),  # no prefix matching: not --max_steps
    (["--max_steps", "2", "--prompts_per_step", "4", "--train_batch_size", "9"],
     "train_batch_size (9) is more than max_steps x prompts_per_step (2 x 4): no update could ever fire"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and len(error.strip().splitlines()) == 1


@pytest.mark.parametrize("text,message", [
    ("alpah: 0.25\n", "unknown key 'alpah'"),
    ("max_steps: 1.5\n", "max_steps in"),
    ("alpha: true\n", "alpha in"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("alpha: [0.5\n", "cannot read --config"),
])
def test_bad_yaml_files_are_one_line_errors(tmp_path, text, message, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--config", str(config_file)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and len(error.strip().splitlines()) == 1


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for name in ("--output_dir", "--max_steps", "--num_generations", "--beta", "--epsilon_high", "--loss_type",
                 "--scale_rewards", "--logging_steps", "--save_steps", "--resume", "--model", "--data", "--reward"):
        assert name in text
    assert "default: 1500" in text
