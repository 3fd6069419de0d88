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


def identity(x: torch.Tensor) -> torch.Tensor:
    """Keras's `linear` activation."""
    return x


def keras2_hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Keras 2's hard_sigmoid, clip(0.2x + 0.5, 0, 1); Keras 3's, relu6(x + 3) / 6, is F.hardsigmoid."""
    return torch.clamp(x * 0.2 + 0.5, 0.0, 1.0)


class SeparableConv(nn.Module):
    """Keras SeparableConv1D/2D: a depthwise convolution (no bias) then a 1x1 pointwise one, over
    as many spatial axes as `kernel_size` has.

    Keys `depthwise.weight`, `pointwise.weight`, `pointwise.bias`.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 depth_multiplier=1, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.depth_multiplier, self.bias = depth_multiplier, bias
        middle = in_channels * depth_multiplier
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(kernel_size) - 1] if isinstance(kernel_size, tuple) else nn.Conv2d
        self.depthwise = conv(in_channels, middle, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=in_channels, bias=False, device=device, dtype=dtype)
        self.pointwise = conv(middle, out_channels, 1, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class KerasAvgPool(nn.Module):
    """Keras average pooling with asymmetric TensorFlow `same` padding: padded cells are not
    counted (torch's `count_include_pad=False` only takes symmetric padding)."""

    def __init__(self, kernel_size, stride, pad):
        super().__init__()
        self.kernel_size, self.stride, self.pad = tuple(kernel_size), tuple(stride), tuple(pad)
        self.pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(self.kernel_size) - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sums = self.pool(F.pad(x, self.pad), self.kernel_size, self.stride)
        cells = self.pool(F.pad(torch.ones_like(x[:1, :1]), self.pad), self.kernel_size, self.stride)
        return sums / cells

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, pad={self.pad}"


class KerasNormalization(nn.Module):
    """Keras's Normalization layer: (x − mean) / max(sqrt(variance), epsilon) per channel
    (or the inverse with `invert`). An adapted layer's mean and variance are buffers in the
    state_dict; values given in the Keras config are constants (non-persistent buffers) of the
    length given, one value or one per channel, broadcast rather than expanded (one value for a
    declared billion channels stays one value). A layer keeping other axes than the channels
    (Keras's `axis` a list, or None) holds its buffers in `shape`, their channels-first broadcast
    shape without the batch."""

    def __init__(self, channels, rank, invert, epsilon, dtype=None, constant_mean=None, constant_variance=None,
                 shape=None):
        super().__init__()
        self.channels, self.rank, self.constant_mean, self.constant_variance = channels, rank, constant_mean, \
            constant_variance
        self.shape = None if shape is None else tuple(shape)
        if constant_mean is None:
            buffer_shape = (channels,) if shape is None else self.shape
            self.register_buffer("mean", torch.empty(buffer_shape, dtype=dtype))
            self.register_buffer("variance", torch.empty(buffer_shape, dtype=dtype))
        else:
            self.register_buffer("mean", torch.tensor(constant_mean, dtype=dtype).reshape(-1), persistent=False)
            self.register_buffer("variance", torch.tensor(constant_variance, dtype=dtype).reshape(-1),
                                 persistent=False)
        # the channels-first broadcast
        self.view = (-1,) + (1,) * (rank - 1) if shape is None else self.shape
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


class KerasRecurrent(nn.Module):
    """Keras's LSTM, GRU or SimpleRNN run step by step, for what `nn.LSTM`, `nn.GRU` and `nn.RNN`
    cannot express: other activations (Keras 2's hard_sigmoid is clip(0.2x + 0.5, 0, 1)), a GRU
    with `reset_after=False` (the reset gate applied to the state before the recurrent matmul;
    one bias) and masked steps, which Keras skips: the state carries over, and so does the output
    (or it is zero with `zero_output_for_mask`).

    The activations are functions (`torch.tanh`, `keras2_hard_sigmoid`). Parameters are torch's names and layouts (`weight_ih_l0`,
    `weight_hh_l0`, `bias_ih_l0`, `bias_hh_l0`; gates i, f, g, o / r, z, n), so weights move between it and `nn.LSTM` unchanged.
    Like `nn.LSTM` with `batch_first=True` it takes (N, T, F), a mask (N, T) or None and an
    initial state, (h,) or for an LSTM (h, c), each (1, N, H); it returns (outputs (N, T, H), last
    state): (1, N, H), for an LSTM the pair (h, c).
    """

    GATES = {"lstm": 4, "gru": 3, "rnn": 1}

    def __init__(self, mode, input_size, hidden_size, bias=True, activation=torch.tanh,
                 recurrent_activation=torch.sigmoid, reset_after=True, zero_output_for_mask=False, device=None, dtype=None):
        super().__init__()
        self.mode, self.input_size, self.hidden_size, self.bias = mode, input_size, hidden_size, bias
        self.activation, self.recurrent_activation = activation, recurrent_activation
        self.reset_after, self.zero_output_for_mask = reset_after, zero_output_for_mask
        rows = self.GATES[mode] * hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.empty(rows, input_size, device=device, dtype=dtype))
        self.weight_hh_l0 = nn.Parameter(torch.empty(rows, hidden_size, device=device, dtype=dtype))
        self.bias_ih_l0 = nn.Parameter(torch.empty(rows, device=device, dtype=dtype)) if bias else None
        recurrent_bias = bias and (mode != "gru" or reset_after)
        self.bias_hh_l0 = nn.Parameter(torch.empty(rows, device=device, dtype=dtype)) if recurrent_bias else None
        bound = hidden_size ** -0.5   # torch's own initialisation of recurrent layers
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    def cell(self, projected, h, c):
        """One step: `projected` is the input's share (x @ W_ih.T + b_ih); returns (h, c)."""
        act, gate = self.activation, self.recurrent_activation
        if self.mode == "lstm":
            i, f, g, o = (projected + F.linear(h, self.weight_hh_l0, self.bias_hh_l0)).chunk(4, 1)
            c = gate(f) * c + gate(i) * act(g)
            return gate(o) * act(c), c
        if self.mode == "rnn":
            return act(projected + F.linear(h, self.weight_hh_l0, self.bias_hh_l0)), c
        x_r, x_z, x_n = projected.chunk(3, 1)
        if self.reset_after:
            h_r, h_z, h_n = F.linear(h, self.weight_hh_l0, self.bias_hh_l0).chunk(3, 1)
            r, z = gate(x_r + h_r), gate(x_z + h_z)
            n = act(x_n + r * h_n)
        else:
            w_r, w_z, w_n = self.weight_hh_l0.chunk(3, 0)
            r, z = gate(x_r + F.linear(h, w_r)), gate(x_z + F.linear(h, w_z))
            n = act(x_n + F.linear(r * h, w_n))
        return z * h + (1 - z) * n, c

    def forward(self, x, mask=None, state=None):
        projected = F.linear(x, self.weight_ih_l0, self.bias_ih_l0)
        h = c = output = x.new_zeros(x.shape[0], self.hidden_size)   # a masked first step outputs 0
        if state is not None:
            h, c = state[0][0], (state[1][0] if self.mode == "lstm" else c)
        outputs = []
        for step in range(x.shape[1]):
            new_h, new_c = self.cell(projected[:, step], h, c)
            if mask is None:
                h, c, output = new_h, new_c, new_h
            else:
                keep = mask[:, step, None]
                skipped = torch.zeros_like(new_h) if self.zero_output_for_mask else output
                h, c = torch.where(keep, new_h, h), torch.where(keep, new_c, c)
                output = torch.where(keep, new_h, skipped)
            outputs.append(output)
        state = (h[None], c[None]) if self.mode == "lstm" else h[None]
        return torch.stack(outputs, 1), state

    def extra_repr(self) -> str:
        return (f"{self.mode}, {self.input_size}, {self.hidden_size}, bias={self.bias}, "
                f"activation={self.activation.__name__}, recurrent_activation={self.recurrent_activation.__name__}")


class KerasMultiHeadAttention(nn.Module):
    """Keras's MultiHeadAttention where `nn.MultiheadAttention` cannot hold it: heads narrower or
    wider than query_features / num_heads, value heads of another width than the key's, or an
    output other than the query's width (Keras's `output_shape`).

    Keras's convention: the query and key are projected to (num_heads, key_dim) per step, the value
    to (num_heads, value_dim); each head attends with softmax(q·kᵀ / sqrt(key_dim)) (scaled by
    key_dim, the head width, not by query_features / num_heads); the heads' outputs, concatenated
    head-major, are projected to `output_shape`. The `nn.Linear` weights are Keras's
    (features, num_heads, dim) kernels flattened head-major and transposed.

    Inputs (N, T, features) and (N, S, features), batch first; output (N, T, *output_shape).
    `attn_mask`, optional, is an additive float mask broadcasting to (N, T, S) (Keras puts a large
    negative number, not -inf, where it does not attend).

    With `gate`, the heads are multiplied by sigmoid(gate(query)) (value heads) before the output
    projection. `explicit_scores` is Keras's own path (with dropout, or returned scores): it puts
    −1e9 (float16: −3e4) at masked scores and zeroes them after the softmax, so a fully masked row
    gives 0 rather than an average. `return_scores`: returns (output, scores (N, heads, T, S)).
    """

    def __init__(self, query_features, key_features, value_features, num_heads, key_dim, value_dim,
                 output_shape, bias=True, dropout=0.0, gate=False, explicit_scores=False, return_scores=False,
                 device=None, dtype=None):
        super().__init__()
        self.query_features, self.key_features, self.value_features = query_features, key_features, value_features
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.output_shape, self.bias, self.dropout = tuple(output_shape), bias, dropout
        self.gate, self.explicit_scores, self.return_scores = gate, explicit_scores, return_scores
        self.scale = key_dim ** -0.5
        self.query = nn.Linear(query_features, num_heads * key_dim, bias=bias, device=device, dtype=dtype)
        self.key = nn.Linear(key_features, num_heads * key_dim, bias=bias, device=device, dtype=dtype)
        if gate:
            self.gate_projection = nn.Linear(query_features, num_heads * value_dim, bias=bias, device=device,
                                             dtype=dtype)
        self.value = nn.Linear(value_features, num_heads * value_dim, bias=bias, device=device, dtype=dtype)
        output_features = 1
        for size in self.output_shape:
            output_features *= size
        self.output = nn.Linear(num_heads * value_dim, output_features, bias=bias, device=device, dtype=dtype)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, target, source = query.shape[0], query.shape[1], key.shape[1]
        # (N, T, heads·dim) -> (N, heads, T, dim): the heads are the outer part of the features.
        q = self.query(query).view(batch, target, self.num_heads, self.key_dim).transpose(1, 2)
        k = self.key(key).view(batch, source, self.num_heads, self.key_dim).transpose(1, 2)
        v = self.value(value).view(batch, source, self.num_heads, self.value_dim).transpose(1, 2)
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(-3)   # the same mask for every head
        dropout = self.dropout if self.training else 0.0
        scores = None
        if self.explicit_scores:
            scores = torch.matmul(q * self.scale, k.transpose(-2, -1))
            if attn_mask is not None:
                keep = attn_mask == 0
                scores = torch.where(keep, scores, -3e4 if scores.dtype == torch.float16 else -1e9)
            scores = torch.softmax(scores, dim=-1)
            if attn_mask is not None:
                scores = torch.where(keep, scores, 0.0)
            heads = torch.matmul(F.dropout(scores, dropout) if dropout else scores, v)
        else:
            heads = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale, dropout_p=dropout)
        heads = heads.transpose(1, 2).reshape(batch, target, self.num_heads * self.value_dim)
        if self.gate:
            heads = heads * torch.sigmoid(self.gate_projection(query))
        output = self.output(heads).view(batch, target, *self.output_shape)
        return (output, scores) if self.return_scores else output

    def extra_repr(self) -> str:
        return (f"{self.query_features}, {self.key_features}, {self.value_features}, num_heads={self.num_heads}, "
                f"key_dim={self.key_dim}, value_dim={self.value_dim}, output_shape={self.output_shape}, "
                f"bias={self.bias}, gate={self.gate}, explicit_scores={self.explicit_scores}")


class KerasPReLU(nn.Module):
    """Keras's PReLU with an alpha that varies along a spatial axis (`nn.PReLU` holds one value
    or one per channel): relu(x) - weight * relu(-x), `weight` of shape `alpha_shape`
    (channels-first, without the batch; 1 along the shared axes)."""

    def __init__(self, alpha_shape, device=None, dtype=None):
        super().__init__()
        self.alpha_shape = tuple(alpha_shape)
        self.weight = nn.Parameter(torch.empty(self.alpha_shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) - self.weight * torch.relu(-x)

    def extra_repr(self) -> str:
        return f"alpha_shape={self.alpha_shape}"


class KerasRMSScaledLayerNorm(nn.Module):
    """Keras's LayerNormalization with `rms_scaling=True`: x · rsqrt(var(x) + eps) · weight over
    the trailing dims `normalized_shape` (the variance about the mean, x itself not centred; no
    bias). `nn.RMSNorm` divides by the root mean square instead, which differs unless the mean is 0."""

    def __init__(self, normalized_shape, eps, device=None, dtype=None):
        super().__init__()
        self.normalized_shape, self.eps = tuple(normalized_shape), eps
        self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        variance = torch.var(x, dim=dims, correction=0, keepdim=True)
        return x * torch.rsqrt(variance + self.eps) * self.weight

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class KerasAttention(nn.Module):
    """Keras's Attention (`score_mode` "dot" or "concat") and AdditiveAttention ("additive"), on
    batch-first (N, T, F) inputs; returns (output (N, Tq, Fv), attention weights (N, Tq, Tv)).

    Scores: dot q·kᵀ (× `scale`); concat `concat_score_weight` · Σ tanh(`scale` · (q + k));
    additive Σ `scale` · tanh(q + k), `scale` of shape (features,). Keras subtracts 1e9 (65504 in
    float16) from the scores of masked value steps and, with `causal`, of future steps, and
    zeroes the output at masked query steps. Masks are bool (N, T), True where a step is kept.
    """

    def __init__(self, score_mode, use_scale, features, causal=False, dropout=0.0, device=None, dtype=None):
        super().__init__()
        self.score_mode, self.use_scale, self.features = score_mode, use_scale, features
        self.causal, self.dropout = causal, dropout
        if use_scale:
            shape = (features,) if score_mode == "additive" else ()
            self.scale = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        if score_mode == "concat":
            self.concat_score_weight = nn.Parameter(torch.ones((), device=device, dtype=dtype))

    def forward(self, query: torch.Tensor, value: torch.Tensor, key: torch.Tensor,
                value_mask: torch.Tensor | None = None, query_mask: torch.Tensor | None = None):
        if self.score_mode == "dot":
            scores = torch.matmul(query, key.transpose(-2, -1))
            if self.use_scale:
                scores = scores * self.scale
        else:
            sums = query.unsqueeze(-2) + key.unsqueeze(-3)      # (N, Tq, Tv, F)
            if self.score_mode == "concat":
                sums = self.scale * sums if self.use_scale else sums
                scores = self.concat_score_weight * torch.tanh(sums).sum(-1)
            else:
                scores = (self.scale * torch.tanh(sums) if self.use_scale else torch.tanh(sums)).sum(-1)
        keep = None if value_mask is None else value_mask.unsqueeze(-2)
        if self.causal:
            lower = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            keep = lower if keep is None else keep & lower
        if keep is not None:
            large = 65504.0 if scores.dtype == torch.float16 else 1.0e9
            scores = torch.where(keep, scores, scores - large)
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        output = torch.matmul(weights, value)
        if query_mask is not None:
            output = torch.where(query_mask.unsqueeze(-1), output, 0.0)
        return output, weights

    def extra_repr(self) -> str:
        return (f"{self.score_mode!r}, use_scale={self.use_scale}, features={self.features}, causal={self.causal}")


class KerasGroupedQueryAttention(nn.Module):
    """Keras's GroupedQueryAttention: the query projected to `num_query_heads` heads, the key and
    value to `num_key_value_heads`, each key/value head serving `num_query_heads /
    num_key_value_heads` consecutive query heads (`repeat_interleave`); softmax(q·kᵀ /
    sqrt(head_dim)); with `gate`, the heads multiplied by sigmoid(gate(query)); the heads,
    concatenated head-major, projected back to `query_features`.

    Inputs (N, T, features) and (N, S, features), batch first; `attn_mask`, optional, an additive
    float mask broadcasting to (N, T, S): 0 where a query step attends, Keras's large negative
    number elsewhere. Returns (output (N, T, query_features), scores (N, heads, T, S) or None).
    Keras's two ways: `explicit_scores` (its path with dropout or returned scores) puts −1e9
    (float16: −3e4) at masked scores and zeroes them after the softmax; otherwise the additive
    mask goes into `scaled_dot_product_attention`, and no scores are returned.
    """

    def __init__(self, query_features, key_features, value_features, num_query_heads, num_key_value_heads,
                 head_dim, bias=True, dropout=0.0, gate=False, explicit_scores=False, device=None, dtype=None):
        super().__init__()
        self.query_features, self.key_features, self.value_features = query_features, key_features, value_features
        self.num_query_heads, self.num_key_value_heads, self.head_dim = num_query_heads, num_key_value_heads, head_dim
        self.bias, self.dropout, self.gate, self.explicit_scores = bias, dropout, gate, explicit_scores
        heads = num_query_heads * head_dim
        self.query = nn.Linear(query_features, heads, bias=bias, device=device, dtype=dtype)
        self.key = nn.Linear(key_features, num_key_value_heads * head_dim, bias=bias, device=device, dtype=dtype)
        if gate:
            self.gate_projection = nn.Linear(query_features, heads, bias=bias, device=device, dtype=dtype)
        self.value = nn.Linear(value_features, num_key_value_heads * head_dim, bias=bias, device=device, dtype=dtype)
        self.output = nn.Linear(heads, query_features, bias=bias, device=device, dtype=dtype)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None):
        batch, target, source = query.shape[0], query.shape[1], key.shape[1]
        repeats = self.num_query_heads // self.num_key_value_heads
        q = self.query(query).view(batch, target, self.num_query_heads, self.head_dim).transpose(1, 2)
        k = self.key(key).view(batch, source, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.value(value).view(batch, source, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(-3)   # the same mask for every head
        dropout = self.dropout if self.training else 0.0
        scores = None
        if self.explicit_scores:
            scores = torch.matmul(q * self.head_dim ** -0.5, k.transpose(-2, -1))
            if attn_mask is not None:
                keep = attn_mask == 0
                scores = torch.where(keep, scores, -3e4 if scores.dtype == torch.float16 else -1e9)
            scores = torch.softmax(scores, dim=-1)
            if attn_mask is not None:
                scores = torch.where(keep, scores, 0.0)
            heads = torch.matmul(F.dropout(scores, dropout) if dropout else scores, v)
        else:
            heads = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.head_dim ** -0.5,
                                                   dropout_p=dropout)
        heads = heads.transpose(1, 2).reshape(batch, target, self.num_query_heads * self.head_dim)
        if self.gate:
            heads = heads * torch.sigmoid(self.gate_projection(query))
        return self.output(heads), scores

    def extra_repr(self) -> str:
        return (f"{self.query_features}, {self.key_features}, {self.value_features}, "
                f"num_query_heads={self.num_query_heads}, num_key_value_heads={self.num_key_value_heads}, "
                f"head_dim={self.head_dim}, bias={self.bias}, gate={self.gate}, "
                f"explicit_scores={self.explicit_scores}")


class KerasConvLSTM(nn.Module):
    """Keras's ConvLSTM1D/2D/3D run step by step. Each step's gates i, f, c, o (Keras's order,
    as an LSTM's) are a convolution of the input frame (`stride`, `dilation`, TensorFlow's padding
    `pad` applied first, in `F.pad`'s order; the bias added) plus a convolution of the last output
    h (stride 1, TensorFlow's `same` padding: an even kernel's extra cell at the end; no bias):
    c = f * c + i * activation(c~), h = o * activation(c), the gates through `recurrent_activation`.

    Parameters `weight_ih` (4·filters, in_channels, k…), `weight_hh` (4·filters, filters, k…) and
    `bias` (4·filters,). Takes (N, C, T, *spatial) (channels first, then time) and an initial state
    (h, c), each (N, filters, *out_spatial), or None (zeros); returns (outputs (N, filters, T,
    *out_spatial), (h, c)).
    """

    def __init__(self, in_channels, filters, kernel_size, stride, dilation, pad, bias=True, activation=torch.tanh,
                 recurrent_activation=torch.sigmoid, device=None, dtype=None):
        super().__init__()
        self.in_channels, self.filters, self.kernel_size = in_channels, filters, tuple(kernel_size)
        self.stride, self.dilation, self.pad = tuple(stride), tuple(dilation), tuple(pad)
        self.activation, self.recurrent_activation = activation, recurrent_activation
        self.conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.kernel_size) - 1]
        same = [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in self.kernel_size]
        self.recurrent_pad = tuple(amount for pair in reversed(same) for amount in pair)
        self.weight_ih = nn.Parameter(torch.empty(4 * filters, in_channels, *self.kernel_size, device=device,
                                                  dtype=dtype))
        self.weight_hh = nn.Parameter(torch.empty(4 * filters, filters, *self.kernel_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(4 * filters, device=device, dtype=dtype)) if bias else None
        bound = (in_channels * len(self.kernel_size)) ** -0.5
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    def forward(self, x, state=None):
        batch, steps = x.shape[0], x.shape[2]
        frames = F.pad(x.transpose(1, 2).flatten(0, 1), self.pad)   # every step's input at once: (N·T, C, …)
        projected = self.conv(frames, self.weight_ih, self.bias, self.stride, 0, self.dilation)
        projected = projected.unflatten(0, (batch, steps))          # (N, T, 4·filters, …)
        if state is None:
            h = c = projected.new_zeros(projected[:, 0, :self.filters].shape)
        else:
            h, c = state
        act, gate = self.activation, self.recurrent_activation
        outputs = []
        for step in range(steps):
            i, f, g, o = (projected[:, step] + self.conv(F.pad(h, self.recurrent_pad), self.weight_hh)).chunk(4, 1)
            c = gate(f) * c + gate(i) * act(g)
            h = gate(o) * act(c)
            outputs.append(h)
        return torch.stack(outputs, 2), (h, c)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.filters}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, pad={self.pad}, bias={self.bias is not None}, "
                f"activation={self.activation.__name__}, recurrent_activation={self.recurrent_activation.__name__}")


class LoRALinear(nn.Module):
    """Keras's Dense with a LoRA adapter: y = x @ (weight + scale * lora_b @ lora_a).T + bias, the
    merged weight made in `forward` as Keras does (the adapter stays trainable on its own).
    `weight` (out, in) as `nn.Linear`'s; `lora_a` (rank, in) and `lora_b` (out, rank) as PEFT's."""

    def __init__(self, in_features, out_features, rank, scale=1.0, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.scale = in_features, out_features, rank, scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight + self.scale * (self.lora_b @ self.lora_a), self.bias)


class LoRAEmbedding(nn.Module):
    """Keras's Embedding with a LoRA adapter: rows of weight + scale * lora_a @ lora_b, merged in
    `forward` as Keras does. All three in Keras's layout: `weight` (vocabulary, dim) as
    `nn.Embedding`'s, `lora_a` (vocabulary, rank), `lora_b` (rank, dim)."""

    def __init__(self, num_embeddings, embedding_dim, rank, scale=1.0, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank, self.scale = num_embeddings, embedding_dim, rank, scale
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        self.lora_a = nn.Parameter(torch.empty(num_embeddings, rank, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(rank, embedding_dim, device=device, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight + self.scale * (self.lora_a @ self.lora_b))


class KerasEinsumDense(nn.Module):
    """Keras's EinsumDense on channels-last input: einsum(equation, x, kernel) + bias, the kernel
    and bias in Keras's own shapes (the bias broadcasts over the output's last axes). With a LoRA
    adapter (`lora_rank`) the kernel is kernel + lora_scale * lora_a @ lora_b, lora_a shaped
    kernel_shape[:-1] + (rank,), lora_b (rank, kernel_shape[-1]), as Keras merges it."""

    def __init__(self, equation, kernel_shape, bias_shape=None, lora_rank=None, lora_scale=1.0, device=None,
                 dtype=None):
        super().__init__()
        self.equation, self.kernel_shape, self.bias_shape = equation, tuple(kernel_shape), bias_shape
        self.lora_rank, self.lora_scale = lora_rank, lora_scale
        self.kernel = nn.Parameter(torch.empty(self.kernel_shape, device=device, dtype=dtype))
        self.bias = None if bias_shape is None else nn.Parameter(torch.empty(tuple(bias_shape), device=device,
                                                                             dtype=dtype))
        if lora_rank is not None:
            self.lora_a = nn.Parameter(torch.empty(self.kernel_shape[:-1] + (lora_rank,), device=device, dtype=dtype))
            self.lora_b = nn.Parameter(torch.empty(lora_rank, self.kernel_shape[-1], device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel
        if self.lora_rank is not None:
            kernel = kernel + self.lora_scale * torch.matmul(self.lora_a, self.lora_b)
        y = torch.einsum(self.equation, x, kernel)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.equation!r}, kernel_shape={self.kernel_shape}, bias_shape={self.bias_shape}"


def keras_encode(ids: torch.Tensor, num_tokens: int, output_mode: str, dtype: torch.dtype,
                 count_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Keras's `encode_categorical_inputs` on ids (N, d1, ..., dk) in Keras's order: `one_hot`
    (N, d1, ..., dk, num_tokens), the last axis dropped where the ids have one of size 1;
    `multi_hot` and `count` encode along axis 1 and drop it: (N, d2, ..., dk, num_tokens), `count`
    summing `count_weights` (the ids' shape) where given. Ids outside [0, num_tokens) count
    nowhere, as in TensorFlow's one_hot and bincount."""
    hot = (ids.unsqueeze(-1) == torch.arange(num_tokens, device=ids.device)).to(dtype)
    if output_mode == "one_hot":
        return hot.squeeze(-2) if ids.dim() > 1 and ids.shape[-1] == 1 else hot
    if count_weights is not None:
        hot = hot * count_weights.unsqueeze(-1)
    return hot.amax(1) if output_mode == "multi_hot" else hot.sum(1)


class KerasCategoryEncoding(nn.Module):
    """Keras's CategoryEncoding: integer ids as one-hot, multi-hot or count vectors, counts
    optionally weighted (`keras_encode`)."""

    def __init__(self, num_tokens, output_mode, output_dtype=torch.float32):
        super().__init__()
        self.num_tokens, self.output_mode, self.output_dtype = num_tokens, output_mode, output_dtype

    def forward(self, ids: torch.Tensor, count_weights: torch.Tensor | None = None) -> torch.Tensor:
        return keras_encode(ids, self.num_tokens, self.output_mode, self.output_dtype, count_weights)


class KerasDiscretization(nn.Module):
    """Keras's Discretization: the bucket of each value, i where boundaries[i - 1] <= x <
    boundaries[i] (int32, as Keras's `digitize`), or those buckets encoded (`keras_encode`)."""

    def __init__(self, bin_boundaries, output_mode="int", output_dtype=torch.float32):
        super().__init__()
        self.bin_boundaries, self.output_mode, self.output_dtype = bin_boundaries, output_mode, output_dtype
        self.register_buffer("boundaries", torch.tensor(bin_boundaries, dtype=torch.float32).reshape(-1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buckets = torch.bucketize(x.float(), self.boundaries, out_int32=True, right=True)
        if self.output_mode == "int":
            return buckets
        return keras_encode(buckets, len(self.bin_boundaries) + 1, self.output_mode, self.output_dtype)


class KerasIntegerLookup(nn.Module):
    """Keras's IntegerLookup (output_mode "int"): a value's index is its position in the
    vocabulary after the special indices, the mask token (if any) first, then the out-of-vocabulary
    indices; a value not in the vocabulary gets the OOV index `value mod num_oov_indices` (floormod).
    With `invert`, indices -> values: the mask index gives mask_token, OOV and unknown indices
    oov_token."""

    def __init__(self, vocabulary, mask_token=None, num_oov_indices=1, invert=False, oov_token=-1):
        super().__init__()
        self.vocabulary, self.mask_token, self.num_oov_indices = vocabulary, mask_token, num_oov_indices
        self.invert, self.oov_token = invert, oov_token
        values = torch.tensor(vocabulary, dtype=torch.int64).reshape(-1)
        sorted_values, order = torch.sort(values)
        self.oov_start = 0 if mask_token is None else 1
        self.register_buffer("sorted_values", sorted_values, persistent=False)
        self.register_buffer("indices", order + self.oov_start + num_oov_indices, persistent=False)
        special = ([] if mask_token is None else [mask_token]) + [oov_token] * num_oov_indices
        self.register_buffer("table", torch.cat([torch.tensor(special, dtype=torch.int64), values]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.long()
        if self.invert:
            known = (x >= 0) & (x < len(self.table))
            return torch.where(known, self.table[x.clamp(0, len(self.table) - 1)], torch.full_like(x, self.oov_token))
        position = torch.searchsorted(self.sorted_values, x).clamp(max=len(self.vocabulary) - 1)
        found = self.sorted_values[position] == x
        oov = torch.remainder(x, self.num_oov_indices) + self.oov_start
        ids = torch.where(found, self.indices[position], oov)
        if self.mask_token is not None:
            ids = torch.where(x == self.mask_token, torch.zeros_like(ids), ids)
        return ids


class KerasReversibleEmbedding(nn.Module):
    """Keras's ReversibleEmbedding: token ids -> rows of `weight` (vocabulary, dim), as
    `nn.Embedding`; with `reverse`, vectors -> logits F.linear(x, weight) (or `reverse_weight`, same
    shape, when the weights are not tied), then tanh(logits / cap) * cap with a `logit_soft_cap`;
    with a `reverse_dtype` the logits computed in that dtype and returned in the input's."""

    def __init__(self, num_embeddings, embedding_dim, tie_weights=True, reverse=False, logit_soft_cap=None,
                 reverse_dtype=None, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.tie_weights = num_embeddings, embedding_dim, tie_weights
        self.reverse, self.logit_soft_cap, self.reverse_dtype = reverse, logit_soft_cap, reverse_dtype
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        if not tie_weights:
            self.reverse_weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reverse:
            return F.embedding(x, self.weight)
        weight = self.weight if self.tie_weights else self.reverse_weight
        if self.reverse_dtype is None:
            logits = F.linear(x, weight)
        else:
            logits = F.linear(x.to(self.reverse_dtype), weight.to(self.reverse_dtype))
        if self.logit_soft_cap is not None:
            logits = torch.tanh(logits / self.logit_soft_cap) * self.logit_soft_cap
        return logits.to(x.dtype)

class KerasSpectralNormalization(nn.Module):
    """Keras's SpectralNormalization at inference: the wrapped `layer` with its stored weights as
    they are (Keras normalises the kernel only in training, writing the result into it);
    `vector_u` (1, units) is the power iteration's state, kept so the weights go back whole."""

    def __init__(self, layer=None, units=1, device=None, dtype=None):
        super().__init__()
        self.units = units
        self.register_module("layer", layer)
        self.register_buffer("vector_u", torch.empty(1, units, device=device, dtype=dtype))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.layer(*inputs)

class LoRAConv(nn.Module):
    """Keras's Conv1D/2D/3D with a LoRA adapter: the convolution with weight + scale * delta,
    delta = lora_b @ lora_a over the rank, merged in `forward` as Keras does. `weight` as
    `nn.Conv2d`'s (out, in/groups, k...); `lora_a` (rank, in/groups, k...), `lora_b` (out, rank)."""

    def __init__(self, in_channels, out_channels, kernel_size, rank, scale=1.0, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, tuple(kernel_size)
        self.rank, self.scale, self.stride, self.padding = rank, scale, stride, padding
        self.dilation, self.groups = dilation, groups
        shape = (in_channels // groups,) + self.kernel_size
        self.weight = nn.Parameter(torch.empty((out_channels,) + shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.lora_a = nn.Parameter(torch.empty((rank,) + shape, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(out_channels, rank, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_b @ self.lora_a.flatten(1)).reshape(self.weight.shape)
        convolution = (F.conv1d, F.conv2d, F.conv3d)[len(self.kernel_size) - 1]
        return convolution(x, self.weight + self.scale * delta, self.bias, self.stride, self.padding, self.dilation,
                           self.groups)

class NAMESPACES:
    """Where the exchange's table of activations finds its torch functions (`torch`, `F`, `helpers`)
    outside a torch graph builder (the seed MLP's trainer)."""

    torch, F = torch, F
    helpers = __import__(__name__, fromlist=["identity"])

