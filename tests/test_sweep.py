import pytest

from dypo_kernels.sweep import whole_group_chunks


@pytest.mark.parametrize("tokens_per_group,capacity,free_tokens,expected", [
    ([3, 4, 2, 5, 6], 7, 0, [(0, 7, 0, 2), (7, 14, 2, 4), (14, 20, 4, 5)]),
    ([3, 0, 4, 0], 7, 0, [(0, 7, 0, 4)]),
    ([0, 0], 7, 0, []),
    ([3, 8], 7, 0, None),
    ([3, 2], 7, 10, [(0, 7, 0, 2), (7, 14, 2, 2), (14, 15, 2, 2)]),
    ([], 7, 3, [(0, 3, 0, 0)]),
    ([3, 4, 2], float("inf"), 5, [(0, 14, 0, 3)]),
])
def test_chunks_hold_whole_groups_then_free_tokens(tokens_per_group, capacity, free_tokens, expected):
    assert whole_group_chunks(tokens_per_group, capacity, free_tokens) == expected
