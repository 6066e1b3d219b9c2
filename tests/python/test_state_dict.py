"""Nested Python dicts round-trip through dsd state dicts; tensors are shared, not copied."""
from collections import OrderedDict

import pytest
import torch

import dsd


def nested():
    return {
        "model": OrderedDict([("l.weight", torch.randn(3, 4)), ("l.bias", torch.zeros(3))]),
        "optim": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(3, 4)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
                              "amsgrad": False, "foreach": None, "params": [0]}],
        },
        "extra": {"name": "run-1", "blob": b"\x00\xff", "epochs": [1, 2, 3], "empty": {}, "none": None},
    }


def assert_same(a, b):
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (a, b)
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.data_ptr() == b.data_ptr() and torch.equal(a, b)
    else:
        assert a == b


def test_nested_dict_round_trips():
    src = nested()
    sd = dsd.StateDict.from_python(src)
    assert len(sd) == 3
    assert_same(src, sd.to_python())


def test_equal_compares_structure_and_bytes():
    a = dsd.StateDict.from_python(nested())
    b = dsd.StateDict.from_python(nested())  # different random weights
    same, why = a.equal(a)
    assert same
    same, why = a.equal(b)
    assert not same and "model.l.weight" in why


def test_unsupported_values_are_rejected_with_their_path():
    with pytest.raises(ValueError, match="Unexpected value type .* at a.b"):
        dsd.StateDict.from_python({"a": {"b": object()}})
    with pytest.raises(TypeError, match="not a str"):
        dsd.StateDict.from_python({("tuple", "key"): 1})
    with pytest.raises(OverflowError):
        dsd.StateDict.from_python({"big": 2**70})
