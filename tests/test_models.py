import pytest
import torch
from pydantic import ValidationError

from models import ModelSpec, build_model
from models.spec import ARCHITECTURES
from models.stacked import StackedAdam, stack


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forecasters_map_a_window_to_the_horizon(architecture):
    spec = ModelSpec(architecture=architecture, window=12, horizon=3, hidden=8, layers=2)
    model = build_model(spec, torch.Generator().manual_seed(0))
    assert model(torch.randn(5, 12)).shape == (5, 3)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
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


def test_a_transformer_needs_heads_that_divide_its_width():
    with pytest.raises(ValidationError, match="multiple of heads"):
        ModelSpec(architecture="transformer", hidden=10, heads=4)
    assert ModelSpec(architecture="transformer", hidden=12, heads=4).heads == 4


def test_fields_added_later_leave_old_fingerprints_alone_until_used():
    # Values computed before heads/grad_clip/lr_decay/early stopping existed: old runs must resume.
    assert ModelSpec().fingerprint() == "85486a256f3914db"
    assert ModelSpec(architecture="lstm", hidden=8).fingerprint() == "7933c5fd9d655b4a"
    assert ModelSpec(grad_clip=1.0).fingerprint() != ModelSpec().fingerprint()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_stacked_networks_compute_each_network_exactly_as_alone(architecture):
    spec = ModelSpec(architecture=architecture, hidden=8, layers=2, heads=2, window=10, horizon=3)
    networks = [build_model(spec, torch.Generator().manual_seed(k)) for k in range(4)]
    stacked = stack(architecture, networks)
    x = torch.randn(4, 6, 10)
    out = stacked(x)
    torch.testing.assert_close(stacked(x[:3], 3), out[:3])  # a prefix of the networks alone
    out.pow(2).sum().backward()
    for k, network in enumerate(networks):
        torch.testing.assert_close(out[k], network(x[k]), rtol=1e-5, atol=1e-6)
        network(x[k]).pow(2).sum().backward()
        grads = {name: p.grad for name, p in network.named_parameters()}
        for index, key in enumerate(stacked.keys):
            torch.testing.assert_close(stacked.to_single(stacked.grads, index, k), grads[key], rtol=1e-4, atol=1e-5)
        assert all(torch.equal(v, network.state_dict()[key]) for key, v in stacked.state_dict_of(k).items())
    for k, weights in enumerate(stacked.state_dicts()):  # all at once, each in its own storage
        assert list(weights) == list(networks[k].state_dict())
        assert all(torch.equal(v, networks[k].state_dict()[key]) and v.untyped_storage().nbytes() == v.nbytes
                   for key, v in weights.items())  # fmt: skip


@pytest.mark.parametrize("layers", [1, 3])
def test_the_stacked_transformer_computes_only_the_last_position_and_still_matches_at_any_depth(layers):
    # One layer: the first layer is also the last (rank-one input, last query only); three: a middle layer too.
    spec = ModelSpec(architecture="transformer", hidden=12, layers=layers, heads=3, window=7, horizon=2)
    networks = [build_model(spec, torch.Generator().manual_seed(k)) for k in range(3)]
    stacked = stack("transformer", networks)
    x = torch.randn(3, 5, 7)
    out = stacked(x)
    out.pow(2).sum().backward()
    last_key_bias = f"encoder.layers.{layers - 1}.self_attn.in_proj_bias"
    for k, network in enumerate(networks):
        torch.testing.assert_close(out[k], network(x[k]), rtol=1e-5, atol=1e-6)
        network(x[k]).pow(2).sum().backward()
        for index, key in enumerate(stacked.keys):
            grad = stacked.to_single(stacked.grads, index, k)
            torch.testing.assert_close(grad, network.get_parameter(key).grad, rtol=1e-4, atol=1e-5)
        # The last layer's keys are never formed, so their bias gets exactly the gradient softmax gives it: 0.
        assert not stacked.to_single(stacked.grads, stacked.keys.index(last_key_bias), k)[12:24].any()


@pytest.mark.parametrize("rowwise", [False, True], ids=["fused-kernel-runs", "rowwise"])
def test_stacked_adam_steps_each_network_as_torch_adam_and_leaves_masked_ones_alone(rowwise):
    spec = ModelSpec(hidden=8, layers=1, window=6, horizon=2)
    networks = [build_model(spec, torch.Generator().manual_seed(k)) for k in range(3)]
    stacked = stack("mlp", networks)
    optimizer = StackedAdam(stacked, lr=1e-2, rowwise=rowwise)
    optimizers = [torch.optim.Adam(n.parameters(), lr=1e-2) for n in networks]
    x = torch.randn(3, 5, 6)
    # Steps 1-3 with everyone (one kernel call over the stack), step 4 with network 1 masked out, steps 5-6
    # with step counts [5, 4, 5] and network 2 at its own rate (a call per run of equal pairs).
    for step, active in enumerate(([True] * 3, [True] * 3, [True] * 3, [True, False, True], [True] * 3, [True] * 3)):
        if step == 4:
            optimizer.lr[2] = 3e-3
            optimizers[2].param_groups[0]["lr"] = 3e-3
        optimizer.zero_grad()
        stacked(x).pow(2).sum().backward()
        optimizer.step(torch.tensor(active))
        for k, (network, single) in enumerate(zip(networks, optimizers)):
            if active[k]:
                single.zero_grad()
                network(x[k]).pow(2).sum().backward()
                single.step()
    for k, weights in enumerate(stacked.state_dicts()):
        for key, value in networks[k].state_dict().items():
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6)
    assert optimizer.steps.tolist() == [6.0, 5.0, 6.0]


def test_stacked_clipping_scales_each_network_by_its_own_norm():
    spec = ModelSpec(hidden=8, layers=1, window=6, horizon=2)
    networks = [build_model(spec, torch.Generator().manual_seed(k)) for k in range(3)]
    stacked = stack("mlp", networks)
    x = torch.randn(3, 5, 6) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)  # tiny, medium, huge gradients
    stacked(x).pow(2).sum().backward()
    optimizer = StackedAdam(stacked, lr=1e-3)
    optimizer.clip_grad_norm(0.5, 3)
    for k, network in enumerate(networks):
        network(x[k]).pow(2).sum().backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 0.5)
        grads = {name: p.grad for name, p in network.named_parameters()}
        for index, key in enumerate(stacked.keys):
            torch.testing.assert_close(stacked.to_single(stacked.grads, index, k), grads[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fresh_weights_from_a_template_equal_a_freshly_built_model(architecture):
    from models import fresh_weights

    spec = ModelSpec(architecture=architecture, hidden=8, heads=2)
    template = build_model(spec, torch.Generator().manual_seed(99))
    built_with, drawn_with = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    built = build_model(spec, built_with).state_dict()
    drawn = fresh_weights(template, drawn_with)
    assert list(drawn) == list(built) and all(torch.equal(drawn[k], built[k]) for k in built)
    assert torch.equal(built_with.get_state(), drawn_with.get_state())  # the shuffles that follow agree too
    assert all(not torch.equal(drawn[k], v) for k, v in fresh_weights(template, torch.Generator().manual_seed(6)).items()
               if v.numel() > 1 and v.std() > 0)  # fmt: skip


def test_fp32_training_on_a_gpu_turns_tf32_off_while_it_runs_and_restores_it():
    """The switches are process-wide, so they are only read here; no GPU is needed to set them."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with ModelSpec().float32_math("cuda:0"):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        for spec, device in ((ModelSpec(precision="bf16"), "cuda"), (ModelSpec(), "cpu")):
            with spec.float32_math(device):
                assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
