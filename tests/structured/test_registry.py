"""The three structural methods are reachable by name, with their parameters checked like every method's."""

import pytest

from prunekit.structured import STRUCTURED, ModelMethod


@pytest.mark.parametrize("name", ["depth", "width", "slicegpt"])
def test_registered(name):
    method = STRUCTURED.create(name, {})
    assert isinstance(method, ModelMethod) and method.name == name and method.needs_calibration


def test_unknown_parameter_is_an_error():
    with pytest.raises(ValueError, match="no parameter"):
        STRUCTURED.create("slicegpt", {"rotation": "per-block"})


@pytest.mark.parametrize("name", ["depth", "width", "slicegpt"])
def test_ratio_out_of_range_is_an_error(name, llama, token_batch):
    with pytest.raises(ValueError, match="ratio"):
        STRUCTURED.create(name, {}).prune_model(llama, [token_batch], 1.0)
