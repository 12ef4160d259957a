import pytest
import torch
from pydantic import ValidationError

from models import ModelSpec, build_model


@pytest.mark.parametrize("architecture", ["mlp", "lstm"])
def test_forecasters_map_a_window_to_the_horizon(architecture):
    spec = ModelSpec(architecture=architecture, window=12, horizon=3, hidden=8, layers=2)
    model = build_model(spec, torch.Generator().manual_seed(0))
    assert model(torch.randn(5, 12)).shape == (5, 3)


@pytest.mark.parametrize("architecture", ["mlp", "lstm"])
def test_weights_are_a_function_of_the_generator_seed_only(architecture):
    spec = ModelSpec(architecture=architecture)
    torch.manual_seed(123)  # the global RNG must not matter
    first = build_model(spec, torch.Generator().manual_seed(7)).state_dict()
    torch.manual_seed(456)
    second = build_model(spec, torch.Generator().manual_seed(7)).state_dict()
    other = build_model(spec, torch.Generator().manual_seed(8)).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_unknown_architecture_and_bad_sizes_are_rejected_with_the_field_named():
    with pytest.raises(ValidationError, match="architecture"):
        ModelSpec(architecture="transformer-xl")
    with pytest.raises(ValidationError, match="window"):
        ModelSpec(window=0)


def test_spec_coerces_names_dicts_and_none():
    assert ModelSpec.coerce(None) == ModelSpec()
    assert ModelSpec.coerce("lstm").architecture == "lstm"
    assert ModelSpec.coerce({"hidden": 4}).hidden == 4
    with pytest.raises(TypeError, match="model must be"):
        ModelSpec.coerce(3)


def test_fingerprint_changes_with_any_field():
    assert ModelSpec().fingerprint() == ModelSpec().fingerprint()
    assert ModelSpec().fingerprint() != ModelSpec(hidden=33).fingerprint()


def test_expanding_window_grows_linearly_then_uses_everything():
    spec = ModelSpec(expanding_window=True, expanding_start=0.25)
    assert [spec.training_rows(100, k) for k in (1, 2, 3, 4, 5)] == [25, 50, 75, 100, 100]
    assert spec.training_rows(3, 1) == 1  # never zero windows
    assert ModelSpec().training_rows(100, 1) == 100
    assert ModelSpec(window=8, horizon=2, holdout_fraction=0.1).train_windows(100) == 100 - 10 - 8 - 2 + 1
