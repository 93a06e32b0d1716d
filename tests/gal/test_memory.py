import pytest

from tests.conftest import available_backends
from tests.memory import assert_memory_flat_in_n_times_v


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "triton"])
def test_fused_gal_loss_memory_grows_with_n_times_d_not_n_times_v(backend):
    # sequences of 64 tokens: a group (two of them) fits one chunk at both vocabularies, so the chunk does not
    # grow to hold it (docs/design.md, "GAL in the sweep"), and the budget alone bounds the logits
    assert_memory_flat_in_n_times_v(impl="fused", loss="gal", backend=backend, T=64)
