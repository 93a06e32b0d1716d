from tests.memory import assert_memory_flat_in_n_times_v


def test_three_teachers_memory_grows_with_n_times_d_not_n_times_v():
    """The CPU backends share the per-chunk pass of the multi-teacher KL (plain torch): one of them is measured."""
    assert_memory_flat_in_n_times_v(impl="fused", loss="kl", teachers=3, backend="torch")
