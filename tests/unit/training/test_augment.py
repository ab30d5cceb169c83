"""Tensor augmentation: translation by pad-and-crop, horizontal flip, seeded determinism."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visionloop.training.augment import augment, random_hflip, random_translate


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shifted(image: torch.Tensor, dy: int, dx: int, max_shift: int) -> torch.Tensor:
    """``image`` (C, H, W) moved by (dy, dx) pixels, borders filled with the edge value (reference)."""
    _, h, w = image.shape
    padded = F.pad(image[None], (max_shift,) * 4, mode="replicate")[0]
    top, left = max_shift - dy, max_shift - dx
    return padded[:, top : top + h, left : left + w]


def find_shift(original: torch.Tensor, moved: torch.Tensor, max_shift: int) -> list[tuple[int, int]]:
    """Every (dy, dx) within range for which ``moved`` is ``original`` shifted by that much."""
    span = range(-max_shift, max_shift + 1)
    return [(dy, dx) for dy in span for dx in span if torch.equal(shifted(original, dy, dx, max_shift), moved)]


def test_translate_keeps_shape_and_dtype():
    x = torch.rand(6, 3, 16, 12)
    out = random_translate(x, 2, gen(0))
    assert out.shape == x.shape
    assert out.dtype == x.dtype


def test_translate_with_no_shift_is_identity():
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(random_translate(x, 0, gen(0)), x)
    assert torch.equal(augment(x, 0, hflip=False, generator=gen(0)), x)


def test_a_single_bright_pixel_moves_by_at_most_max_shift_and_keeps_its_value():
    max_shift = 3
    x = torch.zeros(32, 2, 16, 16)
    x[:, :, 8, 7] = 1.0
    out = random_translate(x, max_shift, gen(1))
    offsets = set()
    for image in out:
        bright = (image == 1.0).nonzero().tolist()
        # one pixel per channel, at the same place in both channels, nothing else changed
        assert len(bright) == 2, bright
        (c0, y0, x0), (c1, y1, x1) = bright
        assert (c0, c1) == (0, 1) and (y0, x0) == (y1, x1)
        assert float(image.sum()) == 2.0
        dy, dx = y0 - 8, x0 - 7
        assert abs(dy) <= max_shift and abs(dx) <= max_shift
        offsets.add((dy, dx))
    # the offsets are random per image, not one offset for the whole batch
    assert len(offsets) > 5


def test_translated_image_is_the_original_shifted_with_replicated_borders():
    max_shift = 2
    x = torch.rand(24, 3, 10, 10)
    out = random_translate(x, max_shift, gen(7))
    seen = set()
    for original, moved in zip(x, out, strict=True):
        matches = find_shift(original, moved, max_shift)
        assert len(matches) == 1, f"not a pure shift of the original: {matches}"
        seen.add(matches[0])
    assert len(seen) > 3


def test_hflip_mirrors_exactly_the_chosen_images_and_leaves_the_rest_untouched():
    x = torch.rand(64, 3, 8, 8)  # random content: no image equals its own mirror
    out = random_hflip(x, gen(3))
    flipped = []
    for i, (original, result) in enumerate(zip(x, out, strict=True)):
        if torch.equal(result, original):
            flipped.append(False)
        else:
            # mirrored along the width axis, in every channel, bit for bit
            assert torch.equal(result, original.flip(-1)), f"image {i} is neither itself nor its mirror"
            flipped.append(True)
    assert 0 < sum(flipped) < len(flipped)
    # the same generator seed chooses the same images
    again = random_hflip(x, gen(3))
    assert torch.equal(again, out)


def test_augment_is_deterministic_for_a_seed_and_varies_across_seeds():
    x = torch.rand(16, 3, 16, 16)
    first = augment(x, 2, hflip=True, generator=gen(42))
    second = augment(x, 2, hflip=True, generator=gen(42))
    other = augment(x, 2, hflip=True, generator=gen(43))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert first.shape == x.shape


def test_augment_without_hflip_only_translates():
    x = torch.rand(16, 3, 12, 12)
    assert torch.equal(augment(x, 2, hflip=False, generator=gen(5)), random_translate(x, 2, gen(5)))
    for original, moved in zip(x, augment(x, 2, hflip=False, generator=gen(5)), strict=True):
        assert len(find_shift(original, moved, 2)) == 1


def test_augment_does_not_modify_its_input():
    x = torch.rand(8, 3, 16, 16)
    before = x.clone()
    augment(x, 2, hflip=True, generator=gen(0))
    assert torch.equal(x, before)
