"""Small torch modules for Keras behaviour that no standard `torch.nn` module has.

Each one reproduces exactly one Keras convention, named in its docstring. Everything else in a
converted model is a standard module (`nn.Conv2d`, `nn.BatchNorm2d`, …). Like torch's own modules,
each keeps its constructor arguments as attributes of the same names, so generated code can
rebuild it (`exchange.codegen`); their source is copied into generated files as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SeparableConv2d(nn.Module):
    """Keras SeparableConv2D: a depthwise convolution (no bias) then a 1x1 pointwise one.

    Keys `depthwise.weight`, `pointwise.weight`, `pointwise.bias`.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 depth_multiplier=1, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.depth_multiplier, self.bias = depth_multiplier, bias
        middle = in_channels * depth_multiplier
        self.depthwise = nn.Conv2d(in_channels, middle, kernel_size, stride=stride, padding=padding,
                                   dilation=dilation, groups=in_channels, bias=False, device=device, dtype=dtype)
        self.pointwise = nn.Conv2d(middle, out_channels, 1, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class KerasAvgPool(nn.Module):
    """Keras average pooling with asymmetric TensorFlow `same` padding: padded cells are not
    counted (torch's `count_include_pad=False` only takes symmetric padding)."""

    def __init__(self, kernel_size, stride, pad):
        super().__init__()
        self.kernel_size, self.stride, self.pad = tuple(kernel_size), tuple(stride), tuple(pad)
        self.pool = F.avg_pool1d if len(self.kernel_size) == 1 else F.avg_pool2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sums = self.pool(F.pad(x, self.pad), self.kernel_size, self.stride)
        cells = self.pool(F.pad(torch.ones_like(x[:1, :1]), self.pad), self.kernel_size, self.stride)
        return sums / cells

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, pad={self.pad}"


class KerasNormalization(nn.Module):
    """Keras's Normalization layer: (x − mean) / max(sqrt(variance), epsilon) per channel
    (or the inverse with `invert`). An adapted layer's mean and variance are buffers in the
    state_dict; values given in the Keras config are constants (non-persistent buffers)."""

    def __init__(self, channels, rank, invert, epsilon, dtype=None, constant_mean=None, constant_variance=None):
        super().__init__()
        self.channels, self.rank, self.constant_mean, self.constant_variance = channels, rank, constant_mean, \
            constant_variance
        if constant_mean is None:
            self.register_buffer("mean", torch.empty(channels, dtype=dtype))
            self.register_buffer("variance", torch.empty(channels, dtype=dtype))
        else:
            self.register_buffer("mean", torch.tensor(constant_mean, dtype=dtype).expand(channels).clone(),
                                 persistent=False)
            self.register_buffer("variance", torch.tensor(constant_variance, dtype=dtype).expand(channels).clone(),
                                 persistent=False)
        self.view = (-1,) + (1,) * (rank - 1)   # channels-first broadcast
        self.invert, self.epsilon = invert, epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, variance = self.mean.view(self.view), self.variance.view(self.view)
        scale = torch.clamp(torch.sqrt(variance), min=self.epsilon)
        return mean + x * scale if self.invert else (x - mean) / scale


class KerasReLU(nn.Module):
    """Keras's ReLU with a threshold, a negative slope or a max value other than 6:
    x > threshold -> clip(x, 0, max_value); below -> negative_slope * (x − threshold)."""

    def __init__(self, max_value, negative_slope, threshold):
        super().__init__()
        self.max_value, self.negative_slope, self.threshold = max_value, negative_slope, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The order of Keras's `relu(x, negative_slope, max_value, threshold)`, step by step.
        if self.threshold != 0:
            y = x * (x > self.threshold).to(x.dtype)
        else:
            y = torch.relu(x)
        if self.max_value is not None:
            y = torch.clamp(y, 0.0, self.max_value)
        if self.negative_slope != 0:
            y = y - self.negative_slope * torch.relu(self.threshold - x)
        return y

    def extra_repr(self) -> str:
        return f"max_value={self.max_value}, negative_slope={self.negative_slope}, threshold={self.threshold}"


class ChannelAffine(nn.Module):
    """Keras's Rescaling with per-channel values: x * scale + offset, the values constants
    (non-persistent buffers) shaped for the channels-first layout."""

    def __init__(self, scales, offsets, rank):
        super().__init__()
        self.scales, self.offsets, self.rank = scales, offsets, rank
        view = (-1,) + (1,) * (rank - 1)
        self.register_buffer("scale", torch.tensor(scales, dtype=torch.float32).reshape(view), persistent=False)
        self.register_buffer("offset", torch.tensor(offsets, dtype=torch.float32).reshape(view), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.offset.to(x.dtype)


class ChannelScale(nn.Module):
    """ConvNeXt's LayerScale: a learned scale per channel, x * gamma, broadcast channels-first."""

    def __init__(self, channels, rank, dtype=None):
        super().__init__()
        self.channels, self.rank = channels, rank
        self.gamma = nn.Parameter(torch.empty(channels, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view((-1,) + (1,) * (self.rank - 1))
