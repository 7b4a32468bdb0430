"""The FLUX.2 tiny autoencoder (taef2), used only to make training data: real photo -> encode -> decode.

A reconstruction has the photo's content and the latent decoder's trace (8x upsampling through
nearest-neighbour
plus convolutions), so real-vs-reconstruction pairs teach the trace rather than the content. The weights
stay in
the shared folder (MIT licence, madebyollin/taesd); this module only rebuilds the network so that the state
dicts
load with `strict=True`. Layer layout follows the facts listed in `weights/taef2/README.md`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.errors import DetectorError

LATENT_CHANNELS = 32
WIDTH = 64


def _conv(c_in: int, c_out: int, *, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class _Block(nn.Module):
    """out = relu(body(x') + x'), x' = x + g(x) in the pooled variant."""

    def __init__(self, channels: int, *, pooled: bool) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(channels, channels),
            nn.ReLU(),
            _conv(channels, channels),
            nn.ReLU(),
            _conv(channels, channels),
        )
        self.pool: nn.Sequential | None = None
        if pooled:
            self.pool = nn.Sequential(
                nn.Conv2d(channels, 4 * channels, 1, bias=False),
                nn.GroupNorm(4, 4 * channels),
                nn.ReLU(),
                nn.Conv2d(4 * channels, channels, 1, bias=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


class _TanhClamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def build_encoder() -> nn.Sequential:
    return nn.Sequential(
        _conv(3, WIDTH),
        _Block(WIDTH, pooled=False),
        _conv(WIDTH, WIDTH, bias=False, stride=2),
        *[_Block(WIDTH, pooled=False) for _ in range(3)],
        _conv(WIDTH, WIDTH, bias=False, stride=2),
        *[_Block(WIDTH, pooled=False) for _ in range(3)],
        _conv(WIDTH, WIDTH, bias=False, stride=2),
        *[_Block(WIDTH, pooled=True) for _ in range(3)],
        _conv(WIDTH, LATENT_CHANNELS),
    )


def build_decoder() -> nn.Sequential:
    layers: list[nn.Module] = [
        _TanhClamp(),
        _conv(LATENT_CHANNELS, WIDTH),
        nn.ReLU(),
        *[_Block(WIDTH, pooled=True) for _ in range(3)],
    ]
    for stage_blocks in (3, 3, 1):
        layers += [nn.Upsample(scale_factor=2), _conv(WIDTH, WIDTH, bias=False)]
        layers += [_Block(WIDTH, pooled=False) for _ in range(stage_blocks)]
    layers.append(_conv(WIDTH, 3))
    return nn.Sequential(*layers)


class TinyAutoencoder(nn.Module):
    """Encoder + decoder; `reconstruct` takes RGB in [0, 1] with sides that are multiples of 8."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = build_encoder()
        self.decoder = build_decoder()

    @classmethod
    def from_dir(cls, weights_dir: Path) -> TinyAutoencoder:
        """Load `taef2_encoder.pth` and `taef2_decoder.pth` strictly.

        Raises:
            DetectorError: the files are missing or do not match the network.
        """
        model = cls()
        for part, module in (("encoder", model.encoder), ("decoder", model.decoder)):
            path = weights_dir / f"taef2_{part}.pth"
            if not path.is_file():
                raise DetectorError(f"taef2 {part} weights not found at {path}")
            state = torch.load(path, map_location="cpu", weights_only=True)
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise DetectorError(f"{path} does not match the taef2 {part}: {exc}") from exc
        return model.eval()

    @torch.inference_mode()
    def reconstruct(self, rgb: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1], H and W multiples of 8 -> reconstruction clamped to [0, 1]."""
        if rgb.shape[-1] % 8 or rgb.shape[-2] % 8:
            raise ValueError(f"taef2 needs sides that are multiples of 8, got {tuple(rgb.shape[-2:])}")
        decoded: torch.Tensor = self.decoder(self.encoder(rgb))
        return decoded.clamp(0.0, 1.0)
