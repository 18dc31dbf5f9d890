"""Many per-key generators, fast: ``default_rng([*prefix, key])`` for a batch of keys.

``np.random.default_rng([seed, epoch, index])`` costs 10-18 µs (``SeedSequence`` hashing its
entropy one call at a time, then a new bit generator and ``Generator``): as much as a fifth of a
loader worker's time per 112x112 JPEG. :func:`keyed_generators` hashes the entropy of a whole
batch of keys at once with numpy (numpy's ``SeedSequence`` algorithm, written out for its pool of
4 words) and seeds one reused ``PCG64`` generator from it for each key, so each generator it
yields draws exactly what ``default_rng([*prefix, key])`` would (a test compares them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["keyed_first_uniforms", "keyed_generators"]

# numpy/random/bit_generator.pyx (SeedSequence, pool_size 4) and pcg64.h (the 128-bit multiplier)
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_POOL = 4
_MASK32, _MASK64, _MASK128 = (1 << 32) - 1, (1 << 64) - 1, (1 << 128) - 1
_DOUBLE_UNIT = 1.0 / (1 << 53)
_PCG_MULT = (2549297995355413924 << 64) + 4865540595714422341


def _words(value: int) -> list[int]:
    """``SeedSequence``'s uint32 words of a non-negative int (little end first; 0 is ``[0]``)."""
    if value < 0:
        raise ValueError(f"expected a non-negative integer, got {value}")
    words = [value & _MASK32] if value == 0 else []
    while value > 0:
        words.append(value & _MASK32)
        value >>= 32
    return words


def _pool(entropy: np.ndarray) -> list[np.ndarray]:
    """``SeedSequence.mix_entropy`` for every row of ``entropy`` (keys x words, uint32) at once."""
    const = _INIT_A

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal const
        value = value ^ np.uint32(const)
        const = (const * _MULT_A) & _MASK32
        value = value * np.uint32(const)
        return value ^ (value >> np.uint32(16))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = np.uint32(_MIX_MULT_L) * x - np.uint32(_MIX_MULT_R) * y
        return result ^ (result >> np.uint32(16))

    zeros = np.zeros(len(entropy), dtype=np.uint32)
    width = entropy.shape[1]
    mixer = [hashmix(entropy[:, i] if i < width else zeros) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                mixer[dst] = mix(mixer[dst], hashmix(mixer[src]))
    for src in range(_POOL, width):
        for dst in range(_POOL):
            mixer[dst] = mix(mixer[dst], hashmix(entropy[:, src]))
    return mixer


def _pcg64_seeds(entropy: np.ndarray) -> np.ndarray:
    """``SeedSequence.generate_state(4, uint64)`` of every row of ``entropy`` (keys x 4)."""
    with np.errstate(over="ignore"):
        pool = _pool(entropy)
        const = _INIT_B
        words = []
        for i in range(8):
            value = pool[i % _POOL] ^ np.uint32(const)
            const = (const * _MULT_B) & _MASK32
            value = value * np.uint32(const)
            words.append(value ^ (value >> np.uint32(16)))
    low, high = np.stack(words[0::2], axis=1), np.stack(words[1::2], axis=1)
    return low.astype(np.uint64) | (high.astype(np.uint64) << np.uint64(32))


def _keyed_states(prefix: Sequence[int], keys: list[int]) -> list[tuple[int, int]] | None:
    """``(state, inc)`` of the ``PCG64`` of ``default_rng([*prefix, key])`` for each key, or None
    where a key does not fit one uint32 word (then the caller seeds the plain way)."""
    head = [w for value in prefix for w in _words(int(value))]
    if not keys:
        return []
    if max(keys) > _MASK32 or min(keys) < 0:  # several words or none
        return None
    entropy = np.empty((len(keys), len(head) + 1), dtype=np.uint32)
    entropy[:, :-1] = head
    entropy[:, -1] = keys
    states = []
    for s0, s1, i0, i1 in _pcg64_seeds(entropy).tolist():
        # pcg64_set_seed: state = 0, inc = 2 * seq + 1, step, state += seed, step
        inc = ((((i0 << 64) | i1) << 1) | 1) & _MASK128
        state = (inc + ((s0 << 64) | s1)) & _MASK128  # the first step from state 0 gives inc
        states.append(((state * _PCG_MULT + inc) & _MASK128, inc))
    return states


def keyed_generators(prefix: Sequence[int], keys: Sequence[int]) -> Iterator[np.random.Generator]:
    """For each key, a generator drawing exactly what ``np.random.default_rng([*prefix, key])``
    would. It is one generator, reset for every key: use it before taking the next."""
    keys = [int(k) for k in keys]
    states = _keyed_states(prefix, keys)
    if states is None:
        for key in keys:
            yield np.random.default_rng([*prefix, key])
        return
    generator = np.random.Generator(np.random.PCG64())
    bit_generator = generator.bit_generator
    for state, inc in states:
        bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": state, "inc": inc},
            "has_uint32": 0,
            "uinteger": 0,
        }
        yield generator


def keyed_first_uniforms(prefix: Sequence[int], keys: Sequence[int]) -> list[float]:
    """For each key, the first ``random()`` of ``np.random.default_rng([*prefix, key])``: what
    :func:`keyed_generators` would give, computed without setting up a generator (half the
    cost, for callers that draw one number per key)."""
    keys = [int(k) for k in keys]
    states = _keyed_states(prefix, keys)
    if states is None:
        return [float(np.random.default_rng([*prefix, key]).random()) for key in keys]
    uniforms = []
    for state, inc in states:
        # pcg64_next64: one step, then the XSL-RR output; random() keeps its top 53 bits
        state = (state * _PCG_MULT + inc) & _MASK128
        word, rot = ((state >> 64) ^ state) & _MASK64, state >> 122
        word = ((word >> rot) | (word << (-rot & 63))) & _MASK64
        uniforms.append((word >> 11) * _DOUBLE_UNIT)
    return uniforms
