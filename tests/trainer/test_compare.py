from dypo import compare


def test_compare_trains_and_measures_the_gradient_variance_at_every_checkpoint(tmp_path):
    """python -m dypo.compare end to end at a tiny size: one dypo run, then both gradients at each of its six
    checkpoints (it broke once, silently, when Trainer.loss changed its arguments)."""
    compare.main(["--seeds", "0", "--max_steps", "6", "--strategies", "dypo", "--batches", "2", "--jobs", "1",
                  "--output_dir", str(tmp_path / "runs"), "--report_dir", str(tmp_path / "docs")])
    (report_path,) = (tmp_path / "docs").glob("strategy_comparison_*.md")  # dated when written
    report = report_path.read_text()
    assert "| dypo | " in report
    variance_rows = [line for line in report.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(line.split("|")[1]) for line in variance_rows] == [1, 2, 3, 4, 5, 6]
    (plot,) = (tmp_path / "docs").glob("gradient_variance_*.png")
    assert plot.stat().st_size > 0
