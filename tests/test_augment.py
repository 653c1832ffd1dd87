import pytest
import torch

from pydefend.augment import augmented


def _batches(x, y, size):
    for start in range(0, len(x), size):
        yield x[start:start + size], y[start:start + size]


def test_crop_shifts_within_an_eighth_and_keeps_labels():
    x = torch.zeros(64, 1, 16, 16)
    x[:, 0, 8, 8] = 1.0  # one lit pixel per image: where it lands is the shift
    y = torch.arange(64) % 10
    out = list(augmented(_batches(x, y, 20), "crop", torch.Generator().manual_seed(0)))
    xs, ys = torch.cat([b[0] for b in out]), torch.cat([b[1] for b in out])
    assert xs.shape == x.shape and torch.equal(ys, y)
    lit = xs[:, 0].flatten(1).argmax(1)
    rows, cols = lit // 16, lit % 16
    assert (xs.flatten(1).sum(1) == 1).all()  # a 2-pixel shift never pushes the pixel out
    assert ((rows - 8).abs() <= 2).all() and ((cols - 8).abs() <= 2).all()
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5  # shifts vary from image to image


def test_none_passes_through_and_bad_modes_are_refused():
    x = torch.rand(200, 3, 8, 8)
    y = torch.zeros(200, dtype=torch.long)
    flipped = next(augmented(iter([(x, y)]), "crop+flip", torch.Generator().manual_seed(1)))[0]
    assert flipped.shape == x.shape and not torch.equal(flipped, x)
    same = next(augmented(iter([(x, y)]), "none", torch.Generator()))[0]
    assert same is x
    with pytest.raises(ValueError, match="augmentation must be one of"):
        next(augmented(iter([(x, y)]), "mixup", torch.Generator()))


def test_flip_is_a_horizontal_mirror():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(400, 1, 1, 1)
    y = torch.zeros(400, dtype=torch.long)
    out = next(augmented(iter([(x, y)]), "crop+flip", torch.Generator().manual_seed(2)))[0]
    # with padding 1 a crop shifts by at most one pixel, so inner columns 1 and 2 hold image values; rows
    # of the original increase left to right, mirrored ones decrease
    kept = out[:, 0, 1, 2] > out[:, 0, 1, 1]
    mirrored = out[:, 0, 1, 2] < out[:, 0, 1, 1]
    assert bool((kept ^ mirrored).all()) and 100 < int(mirrored.sum()) < 300


def test_auto_crops_only_images_of_16_pixels_and_more():
    small, large = torch.rand(8, 1, 8, 8), torch.rand(8, 1, 16, 16)
    y = torch.zeros(8, dtype=torch.long)
    assert next(augmented(iter([(small, y)]), "auto", torch.Generator()))[0] is small
    out = next(augmented(iter([(large, y)]), "auto", torch.Generator().manual_seed(0)))[0]
    ref = next(augmented(iter([(large, y)]), "crop", torch.Generator().manual_seed(0)))[0]
    assert torch.equal(out, ref) and not torch.equal(out, large)
