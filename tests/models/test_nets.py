"""The CNN's input views on images with a known answer, and every network shape a weights file can name."""

from __future__ import annotations

import pytest
import torch

from models._scoring import cnn_outputs, crop_batch_size
from models.nets import FAMILIES, NetConfig, ResidualNet, high_pass, npr_residual


def _nearest_2x(small: torch.Tensor) -> torch.Tensor:
    return small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def test_high_pass_is_zero_on_a_flat_image_and_not_on_noise():
    generator = torch.Generator().manual_seed(0)
    assert high_pass(torch.full((1, 3, 16, 16), 0.4)).abs().max() < 1e-6
    assert high_pass(torch.rand(1, 3, 16, 16, generator=generator)).abs().mean() > 0.05


def test_npr_residual_vanishes_on_a_nearest_2x_upsampling_and_not_on_noise():
    generator = torch.Generator().manual_seed(0)
    upsampled = _nearest_2x(torch.rand(2, 3, 8, 8, generator=generator))
    assert npr_residual(upsampled).abs().max() == 0
    noise = torch.rand(2, 3, 16, 16, generator=generator)
    residual = npr_residual(noise)
    # The anchor pixel of every 2x2 cell is zero by construction, the other three are not.
    assert residual[:, :, ::2, ::2].abs().max() == 0
    assert residual[:, :, 1::2, 1::2].abs().mean() > 0.1


def test_npr_residual_sees_the_phase_of_the_upsampling():
    """Shifted by one pixel, the 2x2 cells straddle the upsampled blocks and the residual appears."""
    generator = torch.Generator().manual_seed(1)
    upsampled = _nearest_2x(torch.rand(1, 3, 9, 9, generator=generator))
    assert npr_residual(upsampled[:, :, 1:17, 1:17]).abs().mean() > 0.05


@pytest.mark.parametrize(
    "config",
    [
        NetConfig(),
        NetConfig(use_pixels=0),
        NetConfig(use_npr=1),
        NetConfig(use_pixels=0, use_npr=1),
        NetConfig(standardise_pixels=1),
        NetConfig(local_head=1),
        NetConfig(local_head=1, blocks=1),
    ],
)
def test_every_view_combination_builds_and_scores_crops(config):
    net = ResidualNet(config).eval()
    views = 1 + config.use_pixels + config.use_npr
    assert net.stem.in_channels == 3 * views
    with torch.no_grad():
        logits = net(torch.rand(4, 3, 64, 64))
    assert logits.shape == (4, len(FAMILIES))
    assert torch.isfinite(logits).all()


def test_a_config_saved_before_the_npr_view_existed_rebuilds_without_it():
    saved_by_1_1_0 = {"stem_channels": 16, "width": 48, "unshuffle": 4, "blocks": 2, "use_pixels": 1}
    config = NetConfig.from_dict(saved_by_1_1_0)
    assert config.use_npr == 0
    assert NetConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("blocks", [1, 2])
def test_a_local_head_position_sees_only_its_receptive_field(blocks):
    """Position (8, 8) of the 4-pixel-stride map covers pixels 32-35; with `blocks` residual blocks it sees
    8 + 16 * blocks pixels around them and nothing else, so the crop's layout cannot reach its logits."""
    torch.manual_seed(0)
    net = ResidualNet(NetConfig(local_head=1, blocks=blocks)).eval()
    crops = torch.rand(1, 3, 64, 64, requires_grad=True)
    net.local_logits(crops)[0, :, 8, 8].sum().backward()
    assert crops.grad is not None
    seen = crops.grad.abs().sum(dim=(0, 1)) > 0
    rows = torch.nonzero(seen.any(dim=1)).flatten()
    columns = torch.nonzero(seen.any(dim=0)).flatten()
    side = 8 + 16 * blocks
    assert (rows.min().item(), rows.max().item()) == (34 - side // 2, 33 + side // 2)
    assert (columns.min().item(), columns.max().item()) == (34 - side // 2, 33 + side // 2)
    with torch.no_grad():
        assert torch.allclose(net(crops), net.local_logits(crops).mean(dim=(2, 3)))


def test_local_logits_are_refused_by_a_network_without_a_local_head():
    with pytest.raises(ValueError, match="local_head"):
        ResidualNet(NetConfig()).local_logits(torch.rand(1, 3, 64, 64))


def test_standardised_pixels_hide_brightness_and_colour_balance():
    """A crop made brighter or tinted (no clipping) scores the same: every view is blind to such shifts."""
    torch.manual_seed(0)
    net = ResidualNet(NetConfig(standardise_pixels=1)).eval()
    crops = 0.2 + 0.5 * torch.rand(3, 3, 64, 64)
    tint = torch.tensor([0.1, -0.05, 0.2]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(net(crops), net(crops + tint), atol=1e-4)
        # The plain pixel view does see it.
        plain = ResidualNet(NetConfig()).eval()
        assert not torch.allclose(plain(crops), plain(crops + tint), atol=1e-4)


def test_per_image_outputs_do_not_depend_on_how_crops_are_batched():
    """The CPU runs the CNN in small batches and the GPU in large ones: a crop batch that splits an image's
    crops across batches must give the same per-image logit, spread and family probabilities."""
    torch.manual_seed(0)
    net = ResidualNet().eval()
    generator = torch.Generator().manual_seed(2)
    per_image = [torch.rand(count, 3, 64, 64, generator=generator) for count in (40, 5, 1, 40)]
    device = torch.device("cpu")
    assert crop_batch_size(device) < sum(len(crops) for crops in per_image)
    whole = cnn_outputs(net, per_image, device, batch_size=256)
    for split in (cnn_outputs(net, per_image, device), cnn_outputs(net, per_image, device, batch_size=3)):
        for one, other in zip(whole, split, strict=True):
            assert one.crops == other.crops
            assert one.logit == pytest.approx(other.logit, abs=1e-5)
            assert one.crop_logit_std == pytest.approx(other.crop_logit_std, abs=1e-5)
            assert one.family_probs == pytest.approx(other.family_probs, abs=1e-6)
    # Distinct images, distinct logits: the comparisons above are not between constants.
    assert len({round(output.logit, 4) for output in whole}) == len(per_image)
