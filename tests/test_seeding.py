"""keyed_generators draws exactly what numpy's default_rng([*prefix, key]) draws."""

from __future__ import annotations

import numpy as np
import pytest

from robustface.utils.seeding import keyed_first_uniforms, keyed_generators


@pytest.mark.parametrize("prefix", [[], [0], [0, 0], [3, 1], [2**40 + 5, 7], [1, 2, 3, 4, 5]])
def test_keyed_generators_equal_default_rng(prefix):
    keys = [0, 1, 5, 4096, 2**31, 2**32 - 1, 2**33, 7]  # 2**33: two words, the plain way
    count = 0
    for key, rng in zip(keys, keyed_generators(prefix, keys), strict=True):
        want = np.random.default_rng([*prefix, key])
        for draw in (
            lambda g: g.random(3),
            lambda g: g.integers(0, 4, 5),  # 32-bit draws: the cached half-word is reset too
            lambda g: g.uniform(0.5, 1.5, 3),
            lambda g: g.normal(size=2),
            lambda g: g.choice((1, 2, 3, 4)),
            lambda g: g.permutation(10),
        ):
            np.testing.assert_array_equal(draw(rng), draw(want))
        count += 1
    assert count == len(keys)
    assert list(keyed_generators(prefix, [])) == []
    with pytest.raises(ValueError, match="non-negative"):
        next(keyed_generators([-1], [0]))


@pytest.mark.parametrize("prefix", [[], [0, 0], [3, 1], [2**40 + 5, 7]])
def test_keyed_first_uniforms_equal_default_rng(prefix):
    keys = [0, 1, 5, 4096, 2**31, 2**32 - 1, 7, 2**33]  # 2**33: two words, the plain way
    many = list(range(3000))  # enough draws that every rotation and both halves occur
    for ks in (keys, many, keys[:-1]):
        want = [np.random.default_rng([*prefix, k]).random() for k in ks]
        assert keyed_first_uniforms(prefix, ks) == want
    assert keyed_first_uniforms(prefix, []) == []
