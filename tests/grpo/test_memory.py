from tests.conftest import available_backends
from tests.memory import assert_memory_flat_in_n_times_v


def test_fused_grpo_loss_memory_grows_with_n_times_d_not_n_times_v():
    """The single sweep holds one chunk of logits; the other token-separable losses share it (dypo_loss's test)."""
    backend = "cpp" if "cpp" in available_backends() else "torch"
    assert_memory_flat_in_n_times_v(impl="fused", loss="grpo", backend=backend)
