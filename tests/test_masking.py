"""Masks on the unit grid: convention, exact visible counts, seeding, shared option, size errors."""
import pytest
import torch

from greenmim.plan.masking import check_mask, num_visible_units, random_mask, unit_grid, visible_indices


def test_per_sample_masks_have_exact_visible_counts_and_differ():
    mask = random_mask(64, 49, 0.75, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (64, 49)
    assert ((~mask).sum(1) == 12).all()  # MAE rounding: int(49 * 0.25)
    assert len({tuple(m.tolist()) for m in mask}) > 60


def test_masks_are_seedable_and_shared_option_repeats_one_mask():
    a = random_mask(4, 49, 0.6, generator=torch.Generator().manual_seed(5))
    b = random_mask(4, 49, 0.6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    shared = random_mask(4, 49, 0.6, shared=True, generator=torch.Generator().manual_seed(5))
    assert (shared == shared[0]).all()


def test_visible_indices_are_ascending_raster_order():
    mask = random_mask(8, 49, 0.75, generator=torch.Generator().manual_seed(1))
    idx = visible_indices(mask)
    assert (idx[:, 1:] > idx[:, :-1]).all()
    assert (~mask).gather(1, idx).all()


def test_unit_grid_and_errors():
    assert unit_grid((224, 160), 32).num_units == 7 * 5
    with pytest.raises(ValueError, match=r"230x224 is not a multiple of the mask unit \(32 px.*use e.g. 224 or 256"):
        unit_grid((230, 224), 32)
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible_units(49, 1.0)
    with pytest.raises(ValueError, match="shape"):
        check_mask(torch.zeros(2, 48, dtype=torch.bool), 2, 49)
