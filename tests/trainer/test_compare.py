from dypo import compare, pretrain, teachers


def test_compare_quick_writes_every_table_the_figures_and_the_claims(tmp_path, monkeypatch):
    """python -m dypo.compare --quick end to end, in this process: the rate sweep, the main table, the ladder,
    the teachers' rows, the grid, Figures 4 and 5, the claims and the gradient variance at each checkpoint of the
    first seed's dypo run (it broke once, silently, when Trainer.loss changed its arguments)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.BASE_RECIPE, "steps", 3)  # the real recipes take seconds each
    monkeypatch.setitem(teachers.BUILTIN_RECIPE, "steps", 3)
    compare.main(["--quick", "--jobs", "0", "--output_dir", str(tmp_path / "runs"),
                  "--report_dir", str(tmp_path / "docs")])
    (report_path,) = (tmp_path / "docs").glob("strategy_comparison_*.md")  # dated when written
    report = report_path.read_text()
    assert "| dypo_alpha1 | " in report.split("What makes a step's gradient norm")[1]
    assert "- `luffy`: LUFFY: mixed-policy GRPO" in report and "--teacher_models builtin`)." in report
    for heading in ("## Strategies", "## Learning rates", "## Main table", "## Ablation ladder", "## Teachers",
                    "## alpha x beta_GAL", "## Claims of the paper", "## Gradient variance"):
        assert heading in report
    for row in ("| dypo | ", "| luffy | ", "| sft_then_rl | ", "| + RL (no grading) | ", "| dypo, one teacher | ",
                "| dypo, hard: SFT + KL to the teachers | "):
        assert row in report
    claims = report.split("## Claims of the paper")[1].split("## Gradient variance")[0]
    assert claims.count("\n- ") == 16  # Table 1 ID and OOD, Table 3, Table 4, Figures 4 and 5
    variance_rows = [line for line in report.splitlines() if line.startswith("| ") and line[2].isdigit() and
                     line.count("|") == 10]
    assert [int(line.split("|")[1]) for line in variance_rows] == [1, 2, 3, 4, 5, 6]
    for figure in ("figure4", "figure5"):
        (plot,) = (tmp_path / "docs").glob(f"{figure}_*.png")
        assert plot.stat().st_size > 0
    runs = sorted(path.name for path in (tmp_path / "runs").iterdir())
    assert len(runs) == 7 * 2 + 9 * 2 + 9  # the sweep, every variant over both seeds, the grid
    compare.main(["--quick", "--jobs", "0", "--output_dir", str(tmp_path / "runs"),
                  "--report_dir", str(tmp_path / "docs")])  # nothing runs again: the summaries are there
    assert "for 41 runs, 41 of them reused from an earlier invocation" in report_path.read_text()
