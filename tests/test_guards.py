"""The shared parameter guards of robustface.utils.guards."""

from __future__ import annotations

import math

import numpy as np
import pytest

from robustface.errors import ParameterTypeError, RobustfaceError
from robustface.utils.guards import check_choice, check_int, check_real


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3)])
def test_check_int_accepts_python_and_numpy_ints(value: object) -> None:
    out = check_int("k", value, 1, 5)
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), 3.0, np.float32(3), "3", None, [3]])
def test_check_int_rejects_other_types(value: object) -> None:
    with pytest.raises(ParameterTypeError, match=r"^k must be an integer, got \w+ ") as info:
        check_int("k", value, 1)
    assert isinstance(info.value, TypeError) and isinstance(info.value, RobustfaceError)
    assert not isinstance(info.value, ValueError)
    assert repr(value) in str(info.value)


def test_check_int_range() -> None:
    assert check_int("k", 1, 1, 1) == 1
    assert check_int("k", -(10**12)) == -(10**12)  # no bounds
    with pytest.raises(ValueError, match=r"^k must be >= 1, got 0$"):
        check_int("k", 0, 1)
    with pytest.raises(ValueError, match=r"^k must be >= 1 and <= 5, got 6$"):
        check_int("k", 6, 1, 5)
    with pytest.raises(ValueError, match=r"^k must be <= 5, got 6$"):
        check_int("k", np.int64(6), maximum=5)


@pytest.mark.parametrize("value", [0.5, 1, np.float32(0.5), np.float64(0.5), np.int64(1)])
def test_check_real_accepts_numbers(value: object) -> None:
    out = check_real("p", value, 0.0, 1.0)
    assert out == float(value) and type(out) is float


@pytest.mark.parametrize("value", [False, np.bool_(False), "0.5", None, 1j, [0.5]])
def test_check_real_rejects_other_types(value: object) -> None:
    with pytest.raises(ParameterTypeError, match=r"^p must be a number, got \w+ ") as info:
        check_real("p", value)
    assert isinstance(info.value, TypeError) and not isinstance(info.value, ValueError)


def test_check_real_finite() -> None:
    for value in (math.inf, -math.inf, math.nan, np.float32("nan")):
        with pytest.raises(ValueError, match=r"^p must be finite, got "):
            check_real("p", value)
    assert check_real("p", math.inf, finite=False) == math.inf
    assert check_real("p", math.inf, 0.0, finite=False) == math.inf
    with pytest.raises(ValueError, match=r"p must be >= 0.0, got nan"):
        check_real("p", math.nan, 0.0, finite=False)  # a bound always rejects NaN


def test_check_real_bounds() -> None:
    assert check_real("p", 0.0, 0.0, 1.0) == 0.0 and check_real("p", 1.0, 0.0, 1.0) == 1.0
    with pytest.raises(ValueError, match=r"^p must be in \[0.0, 1.0\], got 1.5$"):
        check_real("p", 1.5, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"^p must be in \(0.0, 1.0\), got 0.0$"):
        check_real("p", 0.0, 0.0, 1.0, open_low=True, open_high=True)
    with pytest.raises(ValueError, match=r"^p must be in \[0.0, 1.0\), got 1.0$"):
        check_real("p", 1.0, 0.0, 1.0, open_high=True)
    with pytest.raises(ValueError, match=r"^scale must be > 0, got 0.0$"):
        check_real("scale", 0, 0, open_low=True)
    with pytest.raises(ValueError, match=r"^lr must be >= 0, got -1.0$"):
        check_real("lr", -1, 0)
    with pytest.raises(ValueError, match=r"^t must be < 2, got 2.0$"):
        check_real("t", 2, high=2, open_high=True)
    assert check_real("t", 1.999, high=2, open_high=True) == 1.999


def test_check_choice() -> None:
    assert check_choice("mode", "b", ("a", "b")) == "b"
    assert check_choice("k", 3, {1: "x", 3: "y"}) == 3
    with pytest.raises(ValueError, match=r"^mode must be one of a, b, got 'c'$"):
        check_choice("mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match=r"^mode must be one of a, got \['a'\]$"):
        check_choice("mode", ["a"], {"a"})  # unhashable: not a choice, no bare TypeError


def test_call_sites_use_the_shared_guards() -> None:
    """A few of the package's parameters now checked by these guards: types as well as ranges."""
    from robustface.data.image import encode_image
    from robustface.data.synth.identity import make_identities
    from robustface.train.schedule import warmup_poly

    with pytest.raises(ValueError, match=r"^warmup_steps must be >= 0 and <= 10, got 11$"):
        warmup_poly(10, 11)
    with pytest.raises(ParameterTypeError, match=r"^total_steps must be an integer, got float"):
        warmup_poly(10.0)
    assert warmup_poly(np.int64(10), np.int64(2))(1) == pytest.approx(0.5)
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ParameterTypeError, match=r"^quality must be an integer, got float 95\.5$"):
        encode_image(image, quality=95.5)
    with pytest.raises(ValueError, match=r"^quality must be >= 1 and <= 100, got 0$"):
        encode_image(image, quality=0)
    with pytest.raises(ValueError, match=r"^sibling_rate must be in \[0, 1\], got 1\.5$"):
        make_identities(0, 0, 2, sibling_rate=1.5)
    with pytest.raises(ParameterTypeError, match=r"^count must be an integer, got float 2\.0$"):
        make_identities(0, 0, 2.0)
