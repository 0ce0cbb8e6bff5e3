"""3D DenseNet encoder and mirrored decoder, FiLM-conditioned, with a dilated bottleneck block.

Encoder: space-to-depth 2x stem -> per level a MONAI DenseNet block and a FiLM transition (1x1 conv + 2x average
pooling) -> dilated dense block at the bottleneck -> flatten -> linear. Decoder mirrors it: linear ->
dilated dense block -> per level a FiLM 3x3 conv, trilinear upsampling (to the encoder's exact grid, so odd
sizes round-trip), a dense block and a FiLM 1x1 conv -> sub-pixel 2x upsampling (1x1 conv + pixel shuffle)
to logits on the input grid. No convolution runs at full resolution: 3D convolution backward is slow on CPU.

``lean_finest_grid`` drops the two normalise-FiLM-activate passes over the stem's grid that repeat another
(on CPU that grid takes a third of a step): the stem's own (the first transition, or the first dense layer,
normalises the same map again) and, where the decoder's finest level has no dense layers, its closing FiLM
1x1 conv (it sat between the level's FiLM 3x3 conv and the head's 1x1 conv, a second linear mix).

The bottleneck block uses dilations (MONAI ``ConvDenseBlock``) so that every bottleneck voxel sees every
other one; ``DilatedDenseBlock`` checks this against the grid it runs on.

The fast path (``set_fast_path``, on by default) computes the same function with the same parameters in
fewer passes over the two finest grids, where a CPU step spends most of its time: the stem's space-to-depth
+ 1x1 conv runs as the equivalent kernel-2 stride-2 conv (no space-to-depth copy); a transition pools before
its 1x1 conv (both linear, so they commute: the conv runs on an 8x smaller grid); a decoder level without
dense layers mixes channels before the upsampling (same argument); FiLM is fused into the batch norm
(``film.norm_film``); a lean decoder runs the head's 1x1 conv before the upsampling. ``scripts/bench_train.py
--compare`` measures it against the plain path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution, UpSample
from monai.networks.blocks.denseblock import ConvDenseBlock
from monai.networks.layers.factories import Pool
from monai.networks.nets.densenet import _DenseBlock
from monai.networks.utils import pixelshuffle, pixelunshuffle
from torch.nn import functional as F

from cbvae_ext.networks.film import FiLMGenerator, FiLMNormAct, FiLMParams

__all__ = [
    "DenseDecoder",
    "DenseEncoder",
    "DilatedDenseBlock",
    "FiLMConv",
    "FiLMTransition",
    "SpaceToDepth",
    "SpaceToDepthStem",
    "encoder_shapes",
    "set_fast_path",
]


def set_fast_path(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch the fast path of every submodule of ``module`` that has one (a ``fast`` attribute: the blocks
    here, ``FiLMNormAct``, ``ConditionalMean``, ``CBVAELoss``); returns ``module``.

    Both paths share parameters and state dict, so a checkpoint loads into either.
    """
    for m in module.modules():
        if hasattr(m, "fast"):
            m.fast = bool(enabled)
    return module


def encoder_shapes(spatial_shape: Sequence[int], n_levels: int) -> list[tuple[int, ...]]:
    """Grid after each encoder stage: ``[input, stem (ceil /2), level 1 (floor /2), ..., bottleneck]``."""
    shapes = [tuple(int(s) for s in spatial_shape)]
    shapes.append(tuple((s + 1) // 2 for s in shapes[0]))  # space-to-depth stem pads odd sizes
    for _ in range(n_levels):
        shapes.append(tuple(s // 2 for s in shapes[-1]))  # 2x average pooling
    if min(shapes[-1]) < 1:
        raise ValueError(f"spatial_shape {list(spatial_shape)} is too small for {n_levels} levels; use fewer channels")
    return shapes


class _Pass(nn.Module):
    """Stands in for a ``FiLMNormAct`` a lean network drops: returns its input (it takes no FiLM parameters)."""

    def forward(self, x: torch.Tensor, params: FiLMParams = None) -> torch.Tensor:
        return x


class FiLMConv(nn.Module):
    """Convolution -> normalisation -> FiLM -> activation.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: convolution kernel size.
        strides: convolution stride.
        norm: MONAI normalisation name/args.
        act: MONAI activation name/args.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        strides: int = 1,
        norm: str | tuple = "batch",
        act: str | tuple = "leakyrelu",
    ) -> None:
        super().__init__()
        self.channels = out_channels
        self.conv = Convolution(
            spatial_dims,
            in_channels,
            out_channels,
            strides=strides,
            kernel_size=kernel_size,
            bias=False,
            conv_only=True,
        )
        self.post = FiLMNormAct(spatial_dims, out_channels, norm, act)

    def forward(self, x: torch.Tensor, params: FiLMParams = None) -> torch.Tensor:
        return self.post(self.conv(x), params)


class SpaceToDepth(nn.Module):
    """Pad odd sizes with zeros, then move every 2x2x2 block into channels (``C -> 8C``, grid halved, rounded up).

    Args:
        spatial_shape: input grid.
    """

    def __init__(self, spatial_shape: Sequence[int]) -> None:
        super().__init__()
        self.spatial_dims = len(spatial_shape)
        self.pad = [p for s in reversed(spatial_shape) for p in (0, int(s) % 2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        return pixelunshuffle(x, self.spatial_dims, 2)


class SpaceToDepthStem(nn.Module):
    """2x downsampling stem: ``SpaceToDepth``, then 1x1 conv, normalisation, FiLM, activation (``lean``: the conv alone).

    Equivalent to a kernel-2 stride-2 convolution, which the fast path runs instead (its 1x1 weight read
    as the kernel-2 one; the input needs no gradient, so only the weight's is computed); the decoder's
    pixel-shuffle head mirrors it.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels.
        out_channels: output channels.
        spatial_shape: input grid.
        norm: MONAI normalisation name/args.
        act: MONAI activation name/args.
        lean: no normalisation, FiLM or activation (the next layer normalises); it then takes no FiLM parameters.
    """

    fast = True  # set_fast_path

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        spatial_shape: Sequence[int],
        norm: str | tuple,
        act: str | tuple,
        lean: bool = False,
    ) -> None:
        super().__init__()
        self.down = SpaceToDepth(spatial_shape)
        self.conv = FiLMConv(spatial_dims, in_channels * 2**spatial_dims, out_channels, 1, norm=norm, act=act)
        if lean:
            self.conv.post = _Pass()
        self.channels = out_channels
        self.lean = bool(lean)
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor, params: FiLMParams = None) -> torch.Tensor:
        if not self.fast:
            return self.conv(self.down(x), params)
        conv = self.conv.conv.conv
        sd = x.ndim - 2
        # space-to-depth puts offset (i, j, k) of input channel c into channel c * 8 + 4i + 2j + k: the 1x1
        # weight [out, c * 8 + 4i + 2j + k] is the kernel-2 weight [out, c, i, j, k]
        weight = conv.weight.view(conv.out_channels, self.in_channels, *([2] * sd))
        if any(self.down.pad):
            x = F.pad(x, self.down.pad)
        conv_nd = (F.conv1d, F.conv2d, F.conv3d)[sd - 1]
        return self.conv.post(conv_nd(x, weight, conv.bias, stride=2), params)


class FiLMTransition(nn.Module):
    """DenseNet transition with FiLM: normalisation -> FiLM -> activation -> 1x1 conv -> 2x average pooling.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels (FiLM acts on these).
        out_channels: output channels.
        norm: MONAI normalisation name/args.
        act: MONAI activation name/args.
    """

    fast = True  # set_fast_path

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, norm: str | tuple, act: str | tuple
    ) -> None:
        super().__init__()
        self.channels = in_channels
        self.pre = FiLMNormAct(spatial_dims, in_channels, norm, act)
        self.conv = Convolution(spatial_dims, in_channels, out_channels, kernel_size=1, bias=False, conv_only=True)
        self.pool = Pool[Pool.AVG, spatial_dims](kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor, params: FiLMParams = None) -> torch.Tensor:
        h = self.pre(x, params)
        # the fast path pools first: a bias-free 1x1 conv commutes with average pooling
        return self.conv(self.pool(h)) if self.fast else self.pool(self.conv(h))


class DilatedDenseBlock(nn.Module):
    """Dense block of dilated 3x3 convolutions (MONAI ``ConvDenseBlock``) followed by a FiLM 1x1 conv.

    Its receptive field spans ``1 + 2 * sum(dilations)`` voxels per axis; construction fails if that does
    not cover ``grid`` corner to corner.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: input channels.
        growth_rate: channels added by each dilated layer.
        dilations: dilation of each layer.
        out_channels: output channels of the closing 1x1 conv.
        grid: spatial shape the block runs on.
        norm: MONAI normalisation name/args.
        act: MONAI activation name/args.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        growth_rate: int,
        dilations: Sequence[int],
        out_channels: int,
        grid: Sequence[int],
        norm: str | tuple,
        act: str | tuple,
    ) -> None:
        super().__init__()
        if sum(dilations) < max(grid) - 1:
            raise ValueError(
                f"dilations {list(dilations)} give a receptive field of {1 + 2 * sum(dilations)} voxels, "
                f"less than the bottleneck grid {list(grid)} needs; raise the dilations (sum >= {max(grid) - 1})"
            )
        self.dense = ConvDenseBlock(
            spatial_dims, in_channels, [growth_rate] * len(dilations), list(dilations), norm=norm, act=act
        )
        self.out = FiLMConv(
            spatial_dims, in_channels + growth_rate * len(dilations), out_channels, 1, norm=norm, act=act
        )
        self.channels = out_channels

    def forward(self, x: torch.Tensor, params: FiLMParams = None) -> torch.Tensor:
        return self.out(self.dense(x), params)


def _film_params(generator: FiLMGenerator | None, m: torch.Tensor | None, n: int) -> list[FiLMParams]:
    """Per-layer FiLM parameters, or ``n`` Nones for an unconditioned network."""
    if generator is None or m is None:
        return [None] * n
    return list(generator(m))


class DenseEncoder(nn.Module):
    """FiLM-conditioned 3D DenseNet encoder to a flat feature vector (e.g. ``[mu, logvar]``).

    Args:
        spatial_shape: input grid ``(D, H, W)``.
        out_features: length of the output vector.
        channels: stem channels, then the channels after each level's transition.
        block_layers: dense layers per level (``len(channels) - 1`` entries).
        growth_rate: DenseNet growth rate.
        bn_size: DenseNet bottleneck factor (1x1 conv to ``bn_size * growth_rate`` channels).
        dilations: dilations of the bottleneck block.
        bottleneck_channels: channels flattened into the linear layer.
        cond_dim: length of the conditioning vector; 0 for an unconditioned encoder.
        film_hidden: FiLM generator width.
        norm: MONAI normalisation name/args.
        act: MONAI activation name/args.
        in_channels: input channels.
        lean_finest_grid: a stem without normalisation, FiLM and activation (see the module docstring).
    """

    def __init__(
        self,
        spatial_shape: Sequence[int],
        out_features: int,
        channels: Sequence[int],
        block_layers: Sequence[int],
        growth_rate: int,
        bn_size: int,
        dilations: Sequence[int],
        bottleneck_channels: int,
        cond_dim: int = 0,
        film_hidden: int = 64,
        norm: str | tuple = "batch",
        act: str | tuple = "leakyrelu",
        in_channels: int = 1,
        lean_finest_grid: bool = False,
    ) -> None:
        super().__init__()
        if len(block_layers) != len(channels) - 1:
            raise ValueError(f"block_layers {list(block_layers)} needs len(channels) - 1 = {len(channels) - 1} entries")
        sd = len(spatial_shape)
        shapes = encoder_shapes(spatial_shape, len(block_layers))
        self.stem = SpaceToDepthStem(sd, in_channels, channels[0], spatial_shape, norm, act, lean=lean_finest_grid)
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i, n in enumerate(block_layers):
            self.blocks.append(_DenseBlock(sd, n, channels[i], bn_size, growth_rate, 0.0, act=act, norm=norm))
            self.transitions.append(FiLMTransition(sd, channels[i] + n * growth_rate, channels[i + 1], norm, act))
        self.bottleneck = DilatedDenseBlock(
            sd, channels[-1], growth_rate, dilations, bottleneck_channels, shapes[-1], norm, act
        )
        self.fc = nn.Linear(bottleneck_channels * math.prod(shapes[-1]), out_features)
        film_channels = [] if self.stem.lean else [self.stem.channels]
        film_channels += [t.channels for t in self.transitions] + [self.bottleneck.channels]
        self.film = FiLMGenerator(cond_dim, film_channels, film_hidden) if cond_dim else None
        self.n_film = len(film_channels)

    def forward(self, x: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        params = iter(_film_params(self.film, m, self.n_film))  # in the order film_channels lists the layers
        h = self.stem(x, None if self.stem.lean else next(params))
        for block, transition in zip(self.blocks, self.transitions, strict=True):
            h = transition(block(h), next(params))
        h = self.bottleneck(h, next(params))
        return self.fc(h.flatten(1))


class DenseDecoder(nn.Module):
    """FiLM-conditioned 3D DenseNet decoder mirroring ``DenseEncoder``: latent -> logits ``[B, 1, D, H, W]``.

    Args:
        spatial_shape: output grid ``(D, H, W)``.
        latent_size: latent dimension.
        channels: as ``DenseEncoder`` (the decoder walks them backwards).
        block_layers: as ``DenseEncoder``.
        growth_rate: DenseNet growth rate.
        bn_size: DenseNet bottleneck factor.
        dilations: dilations of the bottleneck block.
        bottleneck_channels: channels of the grid the linear layer produces.
        cond_dim: length of the conditioning vector; 0 for an unconditioned decoder.
        film_hidden: FiLM generator width.
        norm: MONAI normalisation name/args.
        act: MONAI activation name/args.
        out_channels: output channels.
        cond_input: the first (linear) layer reads ``[z, m]``, not ``z`` alone, so the conditions shape the
            bottleneck grid itself rather than only rescaling its channels.
        lean_finest_grid: where the finest level has no dense layers, no closing FiLM 1x1 conv there (see the
            module docstring).
    """

    fast = True  # set_fast_path

    def __init__(
        self,
        spatial_shape: Sequence[int],
        latent_size: int,
        channels: Sequence[int],
        block_layers: Sequence[int],
        growth_rate: int,
        bn_size: int,
        dilations: Sequence[int],
        bottleneck_channels: int,
        cond_dim: int = 0,
        film_hidden: int = 64,
        norm: str | tuple = "batch",
        act: str | tuple = "leakyrelu",
        out_channels: int = 1,
        cond_input: bool = False,
        lean_finest_grid: bool = False,
    ) -> None:
        super().__init__()
        if len(block_layers) != len(channels) - 1:
            raise ValueError(f"block_layers {list(block_layers)} needs len(channels) - 1 = {len(channels) - 1} entries")
        sd = len(spatial_shape)
        shapes = encoder_shapes(spatial_shape, len(block_layers))
        self.grid = shapes[-1]
        self.bottleneck_channels = bottleneck_channels
        self.cond_input = bool(cond_input and cond_dim)
        self.fc = nn.Linear(
            latent_size + (cond_dim if self.cond_input else 0), bottleneck_channels * math.prod(self.grid)
        )
        self.fc_post = FiLMNormAct(sd, bottleneck_channels, norm, act)
        self.bottleneck = DilatedDenseBlock(
            sd, bottleneck_channels, growth_rate, dilations, channels[-1], self.grid, norm, act
        )
        self.convs = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.mixes = nn.ModuleList()
        for i in reversed(range(len(block_layers))):
            n = block_layers[i]
            # 3x3 conv before upsampling: 8x cheaper than after, which matters for CPU training
            self.convs.append(FiLMConv(sd, channels[i + 1], channels[i], 3, norm=norm, act=act))
            self.ups.append(
                UpSample(sd, size=shapes[i + 1], mode="nontrainable", interp_mode="trilinear", align_corners=False)
            )
            self.blocks.append(_DenseBlock(sd, n, channels[i], bn_size, growth_rate, 0.0, act=act, norm=norm))
            if lean_finest_grid and i == 0 and n == 0:
                self.mixes.append(_Pass())  # the head's 1x1 conv mixes the channels
            else:
                self.mixes.append(FiLMConv(sd, channels[i] + n * growth_rate, channels[i], 1, norm=norm, act=act))
        # mirror of the stride-2 stem: a learned 2x sub-pixel upsampling (1x1 conv + pixel shuffle), cropped
        # to the input grid, avoids any full-resolution convolution
        scale = 2**sd
        self.head = UpSample(
            sd,
            channels[0],
            out_channels,
            scale_factor=2,
            mode="pixelshuffle",
            pre_conv=Convolution(sd, channels[0], out_channels * scale, kernel_size=1, conv_only=True),
            apply_pad_pool=False,
        )
        self.out_shape = shapes[0]
        film_channels = [bottleneck_channels, self.bottleneck.channels]
        for conv, mix in zip(self.convs, self.mixes, strict=True):
            film_channels += [conv.channels] + ([] if isinstance(mix, _Pass) else [mix.channels])
        self.film = FiLMGenerator(cond_dim, film_channels, film_hidden) if cond_dim else None
        self.n_film = len(film_channels)

    def forward(self, z: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        params = iter(_film_params(self.film, m, self.n_film))  # in the order film_channels lists the layers
        if self.cond_input and m is not None:
            z = torch.cat([z, m.to(z.dtype)], dim=1)
        h = self.fc(z).view(-1, self.bottleneck_channels, *self.grid)
        h = self.fc_post(h, next(params))
        h = self.bottleneck(h, next(params))
        for conv, up, block, mix in zip(self.convs, self.ups, self.blocks, self.mixes, strict=True):
            h = conv(h, next(params))
            if isinstance(mix, _Pass):  # lean finest level: up, then the head
                # the head's 1x1 conv commutes with the (linear, weights summing to 1) upsampling, bias
                # included, so the fast path runs it on the 8x smaller grid
                if self.fast:
                    shuffle = self.head.pixelshuffle  # MONAI's SubpixelUpsample: its conv, then the shuffle
                    return self._crop(pixelshuffle(up(shuffle.conv_block(h)), h.ndim - 2, shuffle.scale_factor))
                h = up(h)
            elif self.fast and len(block) == 0:
                # no dense layers: the mix's bias-free 1x1 conv commutes with the (linear) upsampling, so it
                # runs on the 8x smaller grid
                h = mix.post(up(mix.conv(h)), next(params))
            else:
                h = mix(block(up(h)), next(params))
        return self._crop(self.head(h))

    def _crop(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits on the input grid (the sub-pixel head rounds odd sizes up)."""
        return logits[(..., *(slice(0, s) for s in self.out_shape))]
