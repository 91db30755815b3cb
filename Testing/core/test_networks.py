"""The 3D U-Nets: any size in, same size out; conditioning matters."""

import pytest
import torch

from DiffSegCore.errors import ModelError
from DiffSegCore.networks.unet import build_network


@pytest.mark.parametrize("skip", ["concat", "add", "average"])
def test_any_spatial_size_round_trips(skip):
    net = build_network({"num_classes": 3, "widths": [8, 16, 32], "time_dim": 16, "skip": skip, "coords": True})
    assert net.in_channels == 1 + 3 + 3
    x = torch.randn(2, net.in_channels, 13, 17, 9)
    assert net(x, torch.tensor([0, 4])).shape == (2, 3, 13, 17, 9)


def test_a_crop_is_evaluated_at_its_own_size_not_padded_to_the_downsampling():
    from torch.utils.flop_counter import FlopCounterMode

    net = build_network({"kind": "diffusion", "image_channels": 1, "num_classes": 3, "widths": [8, 16, 32, 64]})

    def flops(shape):  # (z, y, x)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(torch.randn(1, 4, *shape), torch.zeros(1, dtype=torch.long))
        return counter.get_total_flops()

    # 36x52x38 is 0.79 of 40x56x40, the next multiple of the network's 8: its work shrinks with it
    assert flops((36, 52, 38)) / flops((40, 56, 40)) == pytest.approx(36 * 52 * 38 / (40 * 56 * 40), rel=0.03)


def test_time_step_changes_the_output():
    torch.manual_seed(0)
    net = build_network({"num_classes": 2, "widths": [8, 16], "time_dim": 16}).eval()
    x = torch.randn(1, net.in_channels, 8, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([0])), net(x, torch.tensor([4])))


def test_plain_unet_takes_only_the_image():
    net = build_network({"kind": "unet", "num_classes": 3, "widths": [8, 16]})
    assert net.in_channels == 1
    assert net(torch.randn(1, 1, 10, 11, 12)).shape == (1, 3, 10, 11, 12)


def test_default_widths_follow_fu2023():
    net = build_network({"num_classes": 3})
    assert net.config["widths"] == [32, 64, 128, 256]
    assert not any("attn" in name for name, _ in net.named_modules())


def test_unknown_skip_mode_is_a_model_error():
    with pytest.raises(ModelError, match="skip"):
        build_network({"skip": "multiply"})
