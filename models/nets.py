"""The learned part of the detector: a small residual CNN that reads fixed-size native-resolution crops.

The network sees two views of each crop: the pixels themselves (centred) and a high-pass residual (pixel minus
the mean of its 3x3 neighbourhood), where generator traces live and image content mostly does not. After one
full-resolution convolution, a pixel-unshuffle by 4 turns every 4x4 cell into channels: nothing is thrown away
(unlike strided pooling), and an 8-pixel periodicity (JPEG blocks, 8x latent decoders) becomes a 2-cell
pattern
whose phase is carried in channels, which small 3x3 convolutions can then compare cheaply on a CPU.

Optionally (`NetConfig.use_npr`) it also sees a neighbouring-pixel-relationship residual: each pixel minus
the top-left pixel of its 2x2 cell, the trace a nearest or transposed-convolution 2x upsampling leaves (NPR,
Tan et al., "Rethinking the Up-Sampling Operations in CNN-based Generative Network for Generalizable Deepfake
Detection", CVPR 2024, who report it transferring across GAN and diffusion generators). With
`NetConfig.local_head` it is a bag of local patches instead: per-position logits of the first stage, averaged.

The head has three classes, `FAMILIES` = real, diffusion, gan; P(generated) is 1 - P(real).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn

FAMILIES = ("real", "diffusion", "gan")

#: The residual is small next to the pixels; this gain puts both inputs on a similar scale.
RESIDUAL_GAIN = 8.0


@dataclass(frozen=True)
class NetConfig:
    """Shape of `ResidualNet`; saved in the weights file so a file always rebuilds its own network."""

    stem_channels: int = 16
    width: int = 48
    unshuffle: int = 4
    blocks: int = 2
    #: 1: the network sees the pixels and the residual; 0: the residual only (less content, more trace).
    use_pixels: int = 1
    #: 1: also the 2x2 neighbouring-pixel residual (`npr_residual`); 0 in the shipped weights.
    use_npr: int = 0
    #: 1: the pixel view is standardised per crop and channel (`standardised`), so a crop's brightness and
    #: colour balance, which say more about its subject than its maker, cannot reach the network; 0 in the
    #: shipped weights.
    standardise_pixels: int = 0
    #: 1: a 1x1 head classifies every position of the first stage's feature map and their logits are
    #: averaged; the second stage is not built. Each position sees 8 + 16 * `blocks` pixels square (at the
    #: 4-pixel stride of the unshuffled map; `local_logits`), so the network judges a bag of local patches
    #: and never the crop's layout (patch classifiers with a truncated receptive field generalised better
    #: to unseen generators in Chai et al., "What makes fake images detectable?", ECCV 2020). 0 in the
    #: shipped weights.
    local_head: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetConfig:
        return cls(**{key: int(value) for key, value in data.items()})


def high_pass(x: torch.Tensor) -> torch.Tensor:
    """Pixel minus the mean of its 3x3 neighbourhood (reflect padding), per channel."""
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return x - F.avg_pool2d(padded, kernel_size=3, stride=1)


def npr_residual(x: torch.Tensor) -> torch.Tensor:
    """Each pixel minus the top-left pixel of its 2x2 cell (x minus a nearest 2x down- and upsampling of x).

    Crops start on the 8-pixel lattice, so the 2x2 cells have the same phase as the image's own.
    """
    anchors = x[:, :, ::2, ::2]
    return x - anchors.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


#: Standardised pixels are scaled to the spread of centred pixels of typical photos (about 0.25).
STANDARDISED_GAIN = 0.25


def standardised(x: torch.Tensor) -> torch.Tensor:
    """Each crop's channels shifted to mean 0 and scaled to a common spread (flat crops are not amplified)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    spread = x.std(dim=(2, 3), keepdim=True).clamp_min(1.0 / 64)
    return (x - mean) / spread * STANDARDISED_GAIN


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class ResidualNet(nn.Module):
    """Crops (N, 3, S, S) in [0, 1] -> logits (N, len(FAMILIES)). S must be a multiple of 8 (64 by
    default). With `local_head`, the logits are the mean of `local_logits` over positions.
    """

    def __init__(self, config: NetConfig | None = None) -> None:
        super().__init__()
        self.config = config or NetConfig()
        cfg = self.config
        views = 1 + cfg.use_pixels + cfg.use_npr
        self.stem = nn.Conv2d(3 * views, cfg.stem_channels, 3, padding=1)
        self.project = nn.Conv2d(cfg.stem_channels * cfg.unshuffle**2, cfg.width, 1)
        self.stage1 = nn.Sequential(*[ResidualBlock(cfg.width) for _ in range(cfg.blocks)])
        if cfg.local_head:
            self.position_head = nn.Conv2d(cfg.width, len(FAMILIES), 1)
            return
        self.down = nn.Conv2d(cfg.width, 2 * cfg.width, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(2 * cfg.width)
        self.stage2 = nn.Sequential(*[ResidualBlock(2 * cfg.width) for _ in range(cfg.blocks)])
        # Mean and max pooling: a trace may cover the whole crop (a decoder grid) or a small part of it.
        self.head = nn.Linear(4 * cfg.width, len(FAMILIES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.local_head:
            return self.local_logits(x).mean(dim=(2, 3))
        h = self.stage1(self._stem(x))
        h = F.relu(self.down_bn(self.down(h)))
        h = self.stage2(h)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        logits: torch.Tensor = self.head(pooled)
        return logits

    def local_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position logits (N, len(FAMILIES), S/4, S/4) of a `local_head` network."""
        if not self.config.local_head:
            raise ValueError("local_logits needs a network built with NetConfig(local_head=1)")
        logits: torch.Tensor = self.position_head(self.stage1(self._stem(x)))
        return logits

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        views = []
        if self.config.use_pixels:
            views.append(standardised(x) if self.config.standardise_pixels else x - 0.5)
        views.append(high_pass(x) * RESIDUAL_GAIN)
        if self.config.use_npr:
            views.append(npr_residual(x) * RESIDUAL_GAIN)
        features = torch.cat(views, dim=1)
        h = F.relu(self.stem(features))
        h = F.pixel_unshuffle(h, self.config.unshuffle)
        return F.relu(self.project(h))


def generated_logit(logits: torch.Tensor) -> torch.Tensor:
    """log P(generated) - log P(real) from 3-class logits, computed stably."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    return torch.logsumexp(log_probs[:, 1:], dim=1) - log_probs[:, 0]
