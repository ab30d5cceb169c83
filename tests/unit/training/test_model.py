"""The residual CNN: shapes, sizing rules, in-model normalisation, FLOP count."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from visionloop.training.model import (
    ExportWrapper,
    ModelSpec,
    ResidualCNN,
    auto_size,
    count_parameters,
    flops_per_image,
    stage_widths,
)


def make_spec(
    channels: int = 3, classes: int = 5, size: int = 16, width: int = 8, depth: int = 3, mean: float = 0.4
) -> ModelSpec:
    return ModelSpec(
        in_channels=channels,
        num_classes=classes,
        image_size=size,
        width=width,
        depth=depth,
        mean=tuple(mean + 0.1 * i for i in range(channels)),
        std=tuple(0.2 + 0.05 * i for i in range(channels)),
    )


def seeded_model(spec: ModelSpec, seed: int = 0) -> ResidualCNN:
    torch.manual_seed(seed)
    return ResidualCNN(spec).eval()


@pytest.mark.parametrize(("channels", "size", "width", "depth"), [(1, 16, 8, 2), (3, 16, 8, 3), (3, 17, 4, 4)])
def test_output_shapes(channels, size, width, depth):
    spec = make_spec(channels=channels, size=size, width=width, depth=depth, classes=7)
    model = seeded_model(spec)
    x = torch.rand(5, channels, size, size)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        probs, embedding = ExportWrapper(model)(x)
    assert logits.shape == (5, 7)
    assert features.shape == (5, spec.embedding_dim)
    assert probs.shape == (5, 7)
    assert embedding.shape == (5, spec.embedding_dim)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))
    torch.testing.assert_close(probs, torch.softmax(logits, dim=1))
    torch.testing.assert_close(embedding, features)


def test_embedding_dim_doubles_per_stage_and_caps_at_512():
    assert stage_widths(8, 3) == [8, 16, 32]
    assert make_spec(width=8, depth=3).embedding_dim == 32
    assert make_spec(width=16, depth=1).embedding_dim == 16
    assert stage_widths(200, 4) == [200, 400, 512, 512]
    assert make_spec(width=200, depth=4).embedding_dim == 512


@pytest.mark.parametrize(
    ("image_size", "expected_depth"),
    [(4, 2), (8, 2), (16, 3), (28, 3), (32, 4), (64, 5), (128, 5), (512, 5)],
)
def test_auto_depth_is_one_stage_per_halving_down_to_4_pixels_within_2_to_5(image_size, expected_depth):
    _, depth = auto_size(image_size, num_train=100)
    assert depth == expected_depth


def test_auto_width_depends_on_training_set_size():
    assert auto_size(16, num_train=999)[0] == 16
    assert auto_size(16, num_train=1000)[0] == 32
    assert auto_size(16, num_train=50_000)[0] == 32


def test_explicit_width_and_depth_are_kept():
    assert auto_size(64, num_train=10, width=12, depth=1) == (12, 1)
    assert auto_size(64, num_train=10, width=12) == (12, 5)
    assert auto_size(64, num_train=10, depth=2) == (16, 2)


def test_spec_round_trips_through_dict():
    spec = make_spec()
    data = spec.to_dict()
    assert isinstance(data["mean"], tuple)
    # JSON/torch.save turn tuples into lists; from_dict must give back an equal (hashable) spec
    as_lists = {**data, "mean": list(data["mean"]), "std": list(data["std"])}
    assert ModelSpec.from_dict(as_lists) == spec


def test_normalisation_buffers_are_part_of_the_state_but_not_trainable():
    spec = make_spec(channels=3)
    model = ResidualCNN(spec)
    state = model.state_dict()
    torch.testing.assert_close(state["mean"].flatten(), torch.tensor(spec.mean))
    torch.testing.assert_close(state["std"].flatten(), torch.tensor(spec.std))
    parameter_names = {name for name, _ in model.named_parameters()}
    assert "mean" not in parameter_names and "std" not in parameter_names


def test_model_normalises_its_input_with_the_stored_mean_and_std():
    """A model with mean m / std s on x computes what the same weights with mean 0 / std 1 compute on (x-m)/s."""
    spec = make_spec(channels=3, mean=0.3)
    identity_spec = ModelSpec(**{**spec.to_dict(), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)})
    model = seeded_model(spec)
    plain = ResidualCNN(identity_spec).eval()
    weights = {k: v for k, v in model.state_dict().items() if k not in ("mean", "std")}
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    assert sorted(missing) == ["mean", "std"] and not unexpected

    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain((x - mean) / std))
        # a picture that is exactly the training mean is the all-zero input after normalisation
        at_mean = mean.expand(2, 3, 16, 16).clone()
        torch.testing.assert_close(model.forward_features(at_mean), plain.forward_features(torch.zeros(2, 3, 16, 16)))
        # and the normalisation really matters: the same pixels through the plain model differ
        assert not torch.allclose(model(x), plain(x))


def test_flops_per_image_matches_torch_flop_counter():
    for spec in (make_spec(channels=3, size=16, width=8, depth=2), make_spec(channels=1, size=15, width=4, depth=3)):
        model = seeded_model(spec)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.rand(1, spec.in_channels, spec.image_size, spec.image_size))
        assert flops_per_image(spec) == counter.get_total_flops()


def test_flops_are_positive_and_grow_with_width_depth_and_size():
    base = flops_per_image(make_spec(width=8, depth=2, size=16))
    assert base > 0
    assert flops_per_image(make_spec(width=16, depth=2, size=16)) > base
    assert flops_per_image(make_spec(width=8, depth=3, size=16)) > base
    assert flops_per_image(make_spec(width=8, depth=2, size=32)) > base
    # convolution cost is quadratic in width
    assert flops_per_image(make_spec(width=16, depth=2, size=16)) > 3 * base


def test_parameter_count_grows_with_width():
    assert count_parameters(ResidualCNN(make_spec(width=16))) > count_parameters(ResidualCNN(make_spec(width=8))) > 0
