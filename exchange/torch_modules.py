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

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        depth_multiplier=1,
        bias=True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.depth_multiplier, self.bias = depth_multiplier, bias
        middle = in_channels * depth_multiplier
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(kernel_size) - 1] if isinstance(kernel_size, tuple) else nn.Conv2d
        self.depthwise = conv(
            in_channels,
            middle,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=in_channels,
            bias=False,
            device=device,
            dtype=dtype,
        )
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

    mean: torch.Tensor  # buffers (register_buffer)
    variance: torch.Tensor

    def __init__(
        self, channels, rank, invert, epsilon, dtype=None, constant_mean=None, constant_variance=None, shape=None
    ):
        super().__init__()
        self.channels, self.rank, self.constant_mean, self.constant_variance = (
            channels,
            rank,
            constant_mean,
            constant_variance,
        )
        self.shape = None if shape is None else tuple(shape)
        if constant_mean is None:
            buffer_shape = (channels,) if shape is None else self.shape
            self.register_buffer("mean", torch.empty(buffer_shape, dtype=dtype))
            self.register_buffer("variance", torch.empty(buffer_shape, dtype=dtype))
        else:
            self.register_buffer("mean", torch.tensor(constant_mean, dtype=dtype).reshape(-1), persistent=False)
            self.register_buffer("variance", torch.tensor(constant_variance, dtype=dtype).reshape(-1), persistent=False)
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

    scale: torch.Tensor  # buffers (register_buffer)
    offset: torch.Tensor

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

    The activations are functions (`torch.tanh`, `keras2_hard_sigmoid`). Parameters are torch's
    names and layouts (`weight_ih_l0`, `weight_hh_l0`, `bias_ih_l0`, `bias_hh_l0`; gates i, f, g, o /
    r, z, n), so weights move between it and `nn.LSTM` unchanged.
    Like `nn.LSTM` with `batch_first=True` it takes (N, T, F), a mask (N, T) or None and an
    initial state, (h,) or for an LSTM (h, c), each (1, N, H); it returns (outputs (N, T, H), last
    state): (1, N, H), for an LSTM the pair (h, c).
    """

    GATES = {"lstm": 4, "gru": 3, "rnn": 1}

    def __init__(
        self,
        mode,
        input_size,
        hidden_size,
        bias=True,
        activation=torch.tanh,
        recurrent_activation=torch.sigmoid,
        reset_after=True,
        zero_output_for_mask=False,
        device=None,
        dtype=None,
    ):
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
        bound = hidden_size**-0.5  # torch's own initialisation of recurrent layers
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
        h = c = output = x.new_zeros(x.shape[0], self.hidden_size)  # a masked first step outputs 0
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
        return (
            f"{self.mode}, {self.input_size}, {self.hidden_size}, bias={self.bias}, "
            f"activation={self.activation.__name__}, recurrent_activation={self.recurrent_activation.__name__}"
        )


def attend_heads(q, k, v, attn_mask, scale, dropout, explicit_scores):
    """Keras's attention of projected heads q (N, heads, T, dim), k and v (N, heads, S, dim), for
    KerasMultiHeadAttention and KerasGroupedQueryAttention. `attn_mask`, optional, is an additive
    float mask broadcasting to (N, T, S). With `explicit_scores` (Keras's own path, with dropout
    or returned scores) it puts −1e9 (float16: −3e4) at masked scores and zeroes them after the
    softmax, so a fully masked row gives 0; otherwise the mask goes into
    `scaled_dot_product_attention`. Returns (heads (N, heads, T, dim), scores (N, heads, T, S) or None)."""
    if attn_mask is not None:
        attn_mask = attn_mask.unsqueeze(-3)  # the same mask for every head
    if not explicit_scores:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, dropout_p=dropout), None
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if attn_mask is not None:
        keep = attn_mask == 0
        scores = torch.where(keep, scores, -3e4 if scores.dtype == torch.float16 else -1e9)
    scores = torch.softmax(scores, dim=-1)
    if attn_mask is not None:
        scores = torch.where(keep, scores, 0.0)
    return torch.matmul(F.dropout(scores, dropout) if dropout else scores, v), scores


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

    def __init__(
        self,
        query_features,
        key_features,
        value_features,
        num_heads,
        key_dim,
        value_dim,
        output_shape,
        bias=True,
        dropout=0.0,
        gate=False,
        explicit_scores=False,
        return_scores=False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.query_features, self.key_features, self.value_features = query_features, key_features, value_features
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.output_shape, self.bias, self.dropout = tuple(output_shape), bias, dropout
        self.gate, self.explicit_scores, self.return_scores = gate, explicit_scores, return_scores
        self.scale = key_dim**-0.5
        self.query = nn.Linear(query_features, num_heads * key_dim, bias=bias, device=device, dtype=dtype)
        self.key = nn.Linear(key_features, num_heads * key_dim, bias=bias, device=device, dtype=dtype)
        if gate:
            self.gate_projection = nn.Linear(
                query_features, num_heads * value_dim, bias=bias, device=device, dtype=dtype
            )
        self.value = nn.Linear(value_features, num_heads * value_dim, bias=bias, device=device, dtype=dtype)
        output_features = 1
        for size in self.output_shape:
            output_features *= size
        self.output = nn.Linear(num_heads * value_dim, output_features, bias=bias, device=device, dtype=dtype)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        batch, target, source = query.shape[0], query.shape[1], key.shape[1]
        # (N, T, heads·dim) -> (N, heads, T, dim): the heads are the outer part of the features.
        q = self.query(query).view(batch, target, self.num_heads, self.key_dim).transpose(1, 2)
        k = self.key(key).view(batch, source, self.num_heads, self.key_dim).transpose(1, 2)
        v = self.value(value).view(batch, source, self.num_heads, self.value_dim).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        heads, scores = attend_heads(q, k, v, attn_mask, self.scale, dropout, self.explicit_scores)
        heads = heads.transpose(1, 2).reshape(batch, target, self.num_heads * self.value_dim)
        if self.gate:
            heads = heads * torch.sigmoid(self.gate_projection(query))
        output = self.output(heads).view(batch, target, *self.output_shape)
        return (output, scores) if self.return_scores else output

    def extra_repr(self) -> str:
        return (
            f"{self.query_features}, {self.key_features}, {self.value_features}, num_heads={self.num_heads}, "
            f"key_dim={self.key_dim}, value_dim={self.value_dim}, output_shape={self.output_shape}, "
            f"bias={self.bias}, gate={self.gate}, explicit_scores={self.explicit_scores}"
        )


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

    def forward(
        self,
        query: torch.Tensor,
        value: torch.Tensor,
        key: torch.Tensor,
        value_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ):
        if self.score_mode == "dot":
            scores = torch.matmul(query, key.transpose(-2, -1))
            if self.use_scale:
                scores = scores * self.scale
        else:
            sums = query.unsqueeze(-2) + key.unsqueeze(-3)  # (N, Tq, Tv, F)
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
        return f"{self.score_mode!r}, use_scale={self.use_scale}, features={self.features}, causal={self.causal}"


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

    def __init__(
        self,
        query_features,
        key_features,
        value_features,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        bias=True,
        dropout=0.0,
        gate=False,
        explicit_scores=False,
        device=None,
        dtype=None,
    ):
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

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None
    ):
        batch, target, source = query.shape[0], query.shape[1], key.shape[1]
        repeats = self.num_query_heads // self.num_key_value_heads
        q = self.query(query).view(batch, target, self.num_query_heads, self.head_dim).transpose(1, 2)
        k = self.key(key).view(batch, source, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.value(value).view(batch, source, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        dropout = self.dropout if self.training else 0.0
        heads, scores = attend_heads(q, k, v, attn_mask, self.head_dim**-0.5, dropout, self.explicit_scores)
        heads = heads.transpose(1, 2).reshape(batch, target, self.num_query_heads * self.head_dim)
        if self.gate:
            heads = heads * torch.sigmoid(self.gate_projection(query))
        return self.output(heads), scores

    def extra_repr(self) -> str:
        return (
            f"{self.query_features}, {self.key_features}, {self.value_features}, "
            f"num_query_heads={self.num_query_heads}, num_key_value_heads={self.num_key_value_heads}, "
            f"head_dim={self.head_dim}, bias={self.bias}, gate={self.gate}, "
            f"explicit_scores={self.explicit_scores}"
        )


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

    def __init__(
        self,
        in_channels,
        filters,
        kernel_size,
        stride,
        dilation,
        pad,
        bias=True,
        activation=torch.tanh,
        recurrent_activation=torch.sigmoid,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_channels, self.filters, self.kernel_size = in_channels, filters, tuple(kernel_size)
        self.stride, self.dilation, self.pad = tuple(stride), tuple(dilation), tuple(pad)
        self.activation, self.recurrent_activation = activation, recurrent_activation
        self.conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.kernel_size) - 1]
        same = [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in self.kernel_size]
        self.recurrent_pad = tuple(amount for pair in reversed(same) for amount in pair)
        self.weight_ih = nn.Parameter(
            torch.empty(4 * filters, in_channels, *self.kernel_size, device=device, dtype=dtype)
        )
        self.weight_hh = nn.Parameter(torch.empty(4 * filters, filters, *self.kernel_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(4 * filters, device=device, dtype=dtype)) if bias else None
        bound = (in_channels * len(self.kernel_size)) ** -0.5
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    def forward(self, x, state=None):
        batch, steps = x.shape[0], x.shape[2]
        frames = F.pad(x.transpose(1, 2).flatten(0, 1), self.pad)  # every step's input at once: (N·T, C, …)
        projected = self.conv(frames, self.weight_ih, self.bias, self.stride, 0, self.dilation)
        projected = projected.unflatten(0, (batch, steps))  # (N, T, 4·filters, …)
        if state is None:
            h = c = projected.new_zeros(projected[:, 0, : self.filters].shape)
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
        return (
            f"{self.in_channels}, {self.filters}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"dilation={self.dilation}, pad={self.pad}, bias={self.bias is not None}, "
            f"activation={self.activation.__name__}, recurrent_activation={self.recurrent_activation.__name__}"
        )


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

    def __init__(
        self, equation, kernel_shape, bias_shape=None, lora_rank=None, lora_scale=1.0, device=None, dtype=None
    ):
        super().__init__()
        self.equation, self.kernel_shape, self.bias_shape = equation, tuple(kernel_shape), bias_shape
        self.lora_rank, self.lora_scale = lora_rank, lora_scale
        self.kernel = nn.Parameter(torch.empty(self.kernel_shape, device=device, dtype=dtype))
        self.bias = (
            None if bias_shape is None else nn.Parameter(torch.empty(tuple(bias_shape), device=device, dtype=dtype))
        )
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


def keras_encode(
    ids: torch.Tensor, num_tokens: int, output_mode: str, dtype: torch.dtype, count_weights: torch.Tensor | None = None
) -> torch.Tensor:
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

    boundaries: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, bin_boundaries, output_mode="int", output_dtype=torch.float32):
        super().__init__()
        self.bin_boundaries, self.output_mode, self.output_dtype = bin_boundaries, output_mode, output_dtype
        self.register_buffer(
            "boundaries", torch.tensor(bin_boundaries, dtype=torch.float32).reshape(-1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buckets = torch.bucketize(x.float(), self.boundaries, out_int32=True, right=True)
        if self.output_mode == "int":
            return buckets
        return keras_encode(buckets, len(self.bin_boundaries) + 1, self.output_mode, self.output_dtype)


class KerasIntegerLookup(nn.Module):
    """Keras's IntegerLookup: a value's index is its position in the vocabulary after the special
    indices, the mask token first (output_mode "int" only), then the out-of-vocabulary indices; a
    value not in the vocabulary gets OOV index `value mod num_oov_indices` (floormod), or with
    `oov_method="farmhash"` (and several OOV indices) its decimal form hashed (`hash_integers`,
    SipHash with a `salt`). Other output modes encode the indices over the last axis into `depth`
    int64 columns (`keras_encode`; the mask token counts nowhere); "tf_idf" counts them as floats
    times `idf_weights` (one per column). With `invert`, indices -> values: the mask index gives
    mask_token, OOV and unknown indices oov_token."""

    sorted_values: torch.Tensor  # buffers (register_buffer)
    indices: torch.Tensor
    table: torch.Tensor
    idf: torch.Tensor  # with idf_weights only

    def __init__(
        self,
        vocabulary,
        mask_token=None,
        num_oov_indices=1,
        invert=False,
        oov_token=-1,
        output_mode="int",
        oov_method="floormod",
        salt=None,
        depth=None,
        idf_weights=None,
    ):
        super().__init__()
        self.vocabulary, self.mask_token, self.num_oov_indices = vocabulary, mask_token, num_oov_indices
        self.invert, self.oov_token, self.output_mode, self.oov_method = invert, oov_token, output_mode, oov_method
        self.salt, self.depth, self.idf_weights = None if salt is None else tuple(salt), depth, idf_weights
        values = torch.tensor(vocabulary, dtype=torch.int64).reshape(-1)
        sorted_values, order = torch.sort(values)
        self.oov_start = 1 if mask_token is not None and output_mode == "int" else 0
        self.register_buffer("sorted_values", sorted_values, persistent=False)
        self.register_buffer("indices", order + self.oov_start + num_oov_indices, persistent=False)
        special = [mask_token] * self.oov_start + [oov_token] * num_oov_indices
        self.register_buffer("table", torch.cat([torch.tensor(special, dtype=torch.int64), values]), persistent=False)
        if idf_weights is not None:
            self.register_buffer("idf", torch.tensor(idf_weights, dtype=torch.float32).reshape(-1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.long()
        if self.invert:
            known = (x >= 0) & (x < len(self.table))
            return torch.where(known, self.table[x.clamp(0, len(self.table) - 1)], torch.full_like(x, self.oov_token))
        position = torch.searchsorted(self.sorted_values, x).clamp(max=len(self.vocabulary) - 1)
        found = self.sorted_values[position] == x
        if self.num_oov_indices > 1 and self.oov_method == "farmhash":
            oov = hash_integers(x, self.num_oov_indices, self.salt)
        else:
            oov = torch.remainder(x, self.num_oov_indices)
        ids = torch.where(found, self.indices[position], oov + self.oov_start)
        if self.mask_token is not None:  # index 0, or (encoded) an index past every column
            ids = torch.where(x == self.mask_token, 0 if self.output_mode == "int" else (1 << 63) - 1, ids)
        if self.output_mode == "int":
            return ids
        if self.output_mode == "tf_idf":
            return keras_encode(ids, self.depth, "count", torch.float32) * self.idf
        return keras_encode(ids, self.depth, self.output_mode, torch.int64)


class KerasReversibleEmbedding(nn.Module):
    """Keras's ReversibleEmbedding: token ids -> rows of `weight` (vocabulary, dim), as
    `nn.Embedding`; with `reverse`, vectors -> logits F.linear(x, weight) (or `reverse_weight`, same
    shape, when the weights are not tied), then tanh(logits / cap) * cap with a `logit_soft_cap`;
    with a `reverse_dtype` the logits computed in that dtype and returned in the input's."""

    def __init__(
        self,
        num_embeddings,
        embedding_dim,
        tie_weights=True,
        reverse=False,
        logit_soft_cap=None,
        reverse_dtype=None,
        device=None,
        dtype=None,
    ):
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

    layer: nn.Module  # a submodule (register_module)

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

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        rank,
        scale=1.0,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        device=None,
        dtype=None,
    ):
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
        return convolution(
            x, self.weight + self.scale * delta, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class KerasResize(nn.Module):
    """Keras's image resizing on TensorFlow (`tf.image.resize`, v2) over the last two dims
    (height, width) of any tensor, sizes read at call time so any input height and width works:
    Keras's Resizing (`size`, with crop_to_aspect_ratio / pad_to_aspect_ratio), UpSampling2D with
    an interpolation (`scale_factor`: the output is the input's size times it), CenterCrop
    (`center_crop`: the centre when the input is at least `size`, else Keras's `smart_resize`).

    Each axis is resampled as TensorFlow's kernel for the method does (`taps`): output cell i reads
    input cells `indices[i]` with float32 `weights[i]` computed as TensorFlow computes them:
    - nearest (ResizeNearestNeighbor, half-pixel centres): cell min(floor((i + 0.5) * in / out), in - 1).
    - bilinear (ResizeBilinear): position (i + 0.5) * in / out - 0.5, the two cells around it clamped.
    - bicubic (ResizeBicubic): Keys' cubic, a = -0.5, read from a 1024-entry table at
      rint(fraction * 1024); taps outside the image get weight 0, the four renormalised.
    - area (ResizeArea): the input cells under the output cell's footprint, by overlap, / in/out.
    - lanczos3, lanczos5, and bilinear / bicubic with antialias (ScaleAndTranslate with the
      lanczos, triangle or Keys cubic kernel): the kernel widened by in/out when shrinking with
      antialias, over a span of cells around (i + 0.5) * in / out, weights normalised by their sum.
    Everything but nearest computes in float32 and casts back (TensorFlow returns float32 and
    Keras casts it to the layer's dtype).
    """

    SPANS = {"lanczos3": 3, "lanczos5": 5, "bilinear": 1, "bicubic": 2}  # ScaleAndTranslate's kernel radii
    PI = 3.14159265359  # TensorFlow's kPI (rounded to float32 where used)

    def __init__(
        self,
        size=None,
        scale_factor=None,
        interpolation="bilinear",
        antialias=False,
        crop_to_aspect_ratio=False,
        pad_to_aspect_ratio=False,
        fill_value=0.0,
        center_crop=False,
    ):
        super().__init__()
        self.size, self.scale_factor, self.interpolation, self.antialias = size, scale_factor, interpolation, antialias
        self.crop_to_aspect_ratio, self.pad_to_aspect_ratio = crop_to_aspect_ratio, pad_to_aspect_ratio
        self.fill_value, self.center_crop = fill_value, center_crop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        if self.scale_factor is not None:
            return self.resample(x, (height * self.scale_factor[0], width * self.scale_factor[1]))
        target_height, target_width = self.size
        if self.center_crop and height >= target_height and width >= target_width:
            top, left = (height - target_height) // 2, (width - target_width) // 2
            return x[..., top : top + target_height, left : left + target_width]
        if self.crop_to_aspect_ratio or self.center_crop:
            # Resizing computes in float32; CenterCrop's smart_resize in Python floats
            divide = self.float32_quotient if self.crop_to_aspect_ratio else (lambda a, b: int(float(a) / b))
            crop_height = max(min(height, divide(width * target_height, target_width)), 1)
            crop_width = max(min(width, divide(height * target_width, target_height)), 1)
            top, left = divide(height - crop_height, 2), divide(width - crop_width, 2)
            x = x[..., top : top + crop_height, left : left + crop_width]
        elif self.pad_to_aspect_ratio:
            pad_height = max(height, self.float32_quotient(width * target_height, target_width))
            pad_width = max(width, self.float32_quotient(height * target_width, target_height))
            rows, columns = self.float32_quotient(pad_height - height, 2), self.float32_quotient(pad_width - width, 2)
            x = F.pad(x, (columns, columns, rows, rows), value=self.fill_value)
        return self.resample(x, self.size)

    def resample(self, x: torch.Tensor, size) -> torch.Tensor:
        """x resized to `size` (height, width): the rows first, then the columns."""
        dtype = x.dtype
        if self.interpolation != "nearest":
            x = x.float()
        for dim, out_size in ((x.dim() - 2, size[0]), (x.dim() - 1, size[1])):
            indices, weights = self.taps(x.shape[dim], out_size, x.device)
            gathered = x.index_select(dim, indices.reshape(-1))  # (..., out_size * taps, ...)
            if self.interpolation == "nearest":  # one tap of weight 1: the cells as they are
                x = gathered
                continue
            trailing = x.dim() - 1 - dim
            gathered = gathered.reshape(x.shape[:dim] + indices.shape + x.shape[dim + 1 :])
            x = (gathered * weights.reshape(weights.shape + (1,) * trailing)).sum(dim + 1)
        return x.to(dtype)

    def taps(self, in_size: int, out_size: int, device=None):
        """(indices, weights), each (out_size, taps): input cells and float32 weights per output cell."""
        f32 = dict(dtype=torch.float32, device=device)
        scale = torch.tensor(in_size, **f32) / torch.tensor(out_size, **f32)  # TensorFlow's CalculateResizeScale
        cells = torch.arange(out_size, **f32)
        method = self.interpolation
        if method == "nearest":
            index = torch.floor((cells + 0.5) * scale).long().clamp(0, in_size - 1)
            return index[:, None], torch.ones(out_size, 1, **f32)
        if method in ("bilinear", "bicubic") and not self.antialias:
            position = (cells + 0.5) * scale - 0.5
            start = torch.floor(position)
            fraction = position - start
            start = start.long()
            if method == "bilinear":
                indices = torch.stack([start.clamp(min=0), torch.ceil(position).long().clamp(max=in_size - 1)], 1)
                return indices, torch.stack([1 - fraction, fraction], 1)
            offset = torch.round(fraction * 1024).long()  # lrintf: to nearest, ties to even
            table = self.cubic_table(device)
            weights = torch.stack(
                [table[offset, 1], table[offset, 0], table[1024 - offset, 0], table[1024 - offset, 1]], 1
            )
            sources = start[:, None] + torch.arange(-1, 3, device=device)
            weights = torch.where((sources >= 0) & (sources < in_size), weights, torch.zeros_like(weights))
            total = ((weights[:, 0] + weights[:, 1]) + weights[:, 2]) + weights[:, 3]
            weights = (
                weights
                * torch.where(total.abs() >= 1000 * torch.finfo(torch.float32).tiny, 1 / total, torch.ones_like(total))[
                    :, None
                ]
            )
            return sources.clamp(0, in_size - 1), weights
        if method == "area":
            begin, end = cells * scale, (cells + 1) * scale
            count = in_size // out_size + 3  # at least ceil(end) - floor(begin) cells under each output
            sources = torch.floor(begin).long()[:, None] + torch.arange(count, device=device)
            source = sources.float()
            begin, end = begin[:, None], end[:, None]
            overlap = torch.where(
                source < begin,
                torch.where(source + 1 > end, scale, source + 1 - begin),
                torch.where(source + 1 > end, end - source, torch.ones_like(source)),
            )
            weights = torch.where(sources < torch.ceil(end).long(), overlap, torch.zeros_like(overlap))
            return sources.clamp(0, in_size - 1), weights * (1 / scale)
        # ScaleAndTranslate (ComputeSpansCore): lanczos3/5, or triangle / Keys cubic with antialias
        radius = self.SPANS[method]
        inverse_scale = (torch.tensor(out_size, **f32) / torch.tensor(in_size, **f32)).double().reciprocal().float()
        kernel_scale = torch.clamp(inverse_scale, min=1.0) if self.antialias else torch.ones((), **f32)
        widened = -(-radius * in_size // out_size) if self.antialias else radius  # ceil(radius * kernel_scale)
        count = min(2 * max(radius, widened) + 3, in_size)  # a tap more each side for float32 rounding
        sample = (cells + 0.5) * inverse_scale
        start = torch.ceil(sample - radius * kernel_scale - 0.5).long().clamp(0, in_size - 1)
        end = torch.floor(sample + radius * kernel_scale - 0.5).long().clamp(0, in_size - 1) + 1
        sources = start[:, None] + torch.arange(count, device=device)
        distance = torch.abs((sources.float() + 0.5 - sample[:, None]) * (1.0 / kernel_scale))
        weights = self.kernel(distance)
        weights = torch.where(sources < end[:, None], weights, torch.zeros_like(weights))
        total = weights.sum(1, keepdim=True)
        weights = torch.where(
            total.abs() >= 1000 * torch.finfo(torch.float32).tiny, weights * (1 / total), torch.zeros_like(weights)
        )
        return sources.clamp(max=in_size - 1), weights

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """TensorFlow's sampling kernel of this interpolation at distances x >= 0 (float32)."""
        zero = torch.zeros_like(x)
        if self.interpolation == "bilinear":  # triangle
            return torch.where(x < 1, 1 - x, zero)
        if self.interpolation == "bicubic":  # Keys cubic, a = -0.5
            return torch.where(
                x >= 2,
                zero,
                torch.where(x >= 1, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0, ((1.5 * x - 2.5) * x) * x + 1.0),
            )
        radius = float(self.SPANS[self.interpolation])
        pi = torch.full((), self.PI, dtype=torch.float32, device=x.device)
        value = radius * torch.sin(pi * x) * torch.sin(pi * x / radius) / (pi * pi * x * x)
        return torch.where(x > radius, zero, torch.where(x <= 1e-3, torch.ones_like(x), value))

    @staticmethod
    def cubic_table(device=None) -> torch.Tensor:
        """ResizeBicubic's table (1025, 2): Keys' cubic (a = -0.5) at x = i / 1024 and at x + 1,
        computed in float64 and stored as float32."""
        a = -0.5
        x = torch.arange(1025, dtype=torch.float64, device=device) / 1024
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a
        return torch.stack([near, far], 1).float()

    @staticmethod
    def float32_quotient(numerator: int, denominator: int) -> int:
        """int(float32(numerator) / float32(denominator)) for non-negative ints, as TensorFlow
        computes Keras's aspect-ratio crops and pads: each rounded to float32's 24 significant
        bits (to nearest, ties to even), in integer arithmetic."""

        def rounded(top: int, bottom: int) -> tuple[int, int]:
            """top / bottom rounded to 24 significant bits, as (mantissa, shift): mantissa / 2**shift."""
            if top == 0:
                return 0, 0
            shift = 24 - (top.bit_length() - bottom.bit_length())
            while True:
                scaled_top, scaled_bottom = (top << shift, bottom) if shift >= 0 else (top, bottom << -shift)
                mantissa, remainder = divmod(scaled_top, scaled_bottom)
                if mantissa >= 1 << 24:
                    shift -= 1
                elif mantissa < 1 << 23:
                    shift += 1
                else:
                    break
            if 2 * remainder > scaled_bottom or (2 * remainder == scaled_bottom and mantissa % 2):
                mantissa += 1
            return mantissa, shift

        def as_int(mantissa: int, shift: int) -> int:  # exact for shift <= 0; rounded toward zero otherwise
            return mantissa >> shift if shift >= 0 else mantissa << -shift

        top, bottom = (as_int(*rounded(value, 1)) for value in (numerator, denominator))
        return as_int(*rounded(top, bottom)) if bottom else 0


class KerasAutoContrast(nn.Module):
    """Keras's AutoContrast: each image's values (per channel: the minimum and maximum over the
    torch axes 2 and 3, Keras's axes 1 and 2) stretched to `value_range`, computed as Keras does on
    a 0..255 scale, clipped to it; where that gives NaN (a flat image) the input is kept."""

    def __init__(self, value_range=(0, 255)):
        super().__init__()
        self.value_range = value_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_value, high_value = (torch.tensor(value, dtype=x.dtype) for value in self.value_range)
        images = (x - low_value) / (high_value - low_value) * 255.0 if tuple(self.value_range) != (0, 255) else x
        low = torch.amin(images, dim=(2, 3), keepdim=True)
        high = torch.amax(images, dim=(2, 3), keepdim=True)
        scale = 255.0 / (high - low)
        results = torch.clamp(images * scale + -low * scale, 0.0, 255.0)
        if tuple(self.value_range) != (0, 255):
            results = results / 255.0 * (high_value - low_value) + low_value
        return torch.where(torch.isnan(results), x, results)


def tensorflow_log(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's float32 `log` on CPU (Eigen's `plog_impl_float`, bit for bit): log(m) of the
    mantissa m in [sqrt(1/2), sqrt(2)) by a rational polynomial, plus e * ln 2. torch's `log`
    differs from it by an ulp in about 5% of values, which the mel filterbank's differences of
    nearby mel frequencies magnify to 1e-5. Other dtypes: torch's `log`."""
    if x.dtype != torch.float32:
        return torch.log(x)
    mantissa, exponent = torch.frexp(x)
    below = mantissa < 0.70710677
    exponent = exponent.to(torch.float32) - below.to(torch.float32)
    shifted = (mantissa - 1.0) + torch.where(below, mantissa, torch.zeros_like(mantissa))
    numerator = (0.18256296 * shifted + 1.0000000190281063) * shifted + 1.0000000190281136
    numerator = numerator * shifted
    denominator = ((0.049616247954120038 * shifted + 0.5992324959082352) * shifted + 1.4999999999999927) * shifted + 1.0
    result = exponent * 0.6931472 + numerator / denominator
    result = torch.where(x == float("inf"), x, result)
    result = torch.where(x < 1.1754944e-38, torch.full_like(x, -float("inf")), result)  # denormals: zero
    return torch.where(torch.isnan(x) | (x < 0), torch.full_like(x, float("nan")), result)


class KerasMelSpectrogram(nn.Module):
    """Keras's MelSpectrogram (TensorFlow backend) on (N, T) signals, giving (N, frames, mel):
    reflect-padded by fft_length // 2 on both sides, frames of fft_length every sequence_stride
    samples times the window (sequence_length long, centred in fft_length by zeros; with no window
    all fft_length samples count), |rfft| **
    mag_exp, times the mel matrix; in dB (`power_to_db`): 10 log10(max(p, min_power)) less 10
    log10(max(|ref_power|, min_power)), raised to (the maximum over the whole batch) - top_db.
    Computed in float32 (float64 inputs in float64), as Keras does."""

    window_values: torch.Tensor  # buffers (register_buffer)
    mel_matrix: torch.Tensor

    def __init__(
        self,
        fft_length,
        sequence_stride,
        sequence_length,
        window="hann",
        sampling_rate=16000,
        num_mel_bins=128,
        min_freq=20.0,
        max_freq=8000,
        power_to_db=True,
        top_db=80.0,
        mag_exp=2.0,
        min_power=1e-10,
        ref_power=1.0,
    ):
        super().__init__()
        self.fft_length, self.sequence_stride, self.sequence_length = fft_length, sequence_stride, sequence_length
        self.window, self.sampling_rate, self.num_mel_bins = window, sampling_rate, num_mel_bins
        self.min_freq, self.max_freq, self.power_to_db, self.top_db = min_freq, max_freq, power_to_db, top_db
        self.mag_exp, self.min_power, self.ref_power = mag_exp, min_power, ref_power
        left = (fft_length - sequence_length) // 2  # no window: none at all, over all fft_length samples
        window_values = (
            torch.ones(fft_length)
            if window is None
            else F.pad(
                self.keras_window(window, sequence_length, torch.float32), (left, fft_length - sequence_length - left)
            )
        )
        self.register_buffer("window_values", window_values, persistent=False)
        mel_matrix = self.keras_mel_matrix(num_mel_bins, fft_length // 2 + 1, sampling_rate, min_freq, max_freq)
        self.register_buffer("mel_matrix", mel_matrix, persistent=False)

    @staticmethod
    def tensorflow_linspace(start: torch.Tensor, stop: torch.Tensor, num: int) -> torch.Tensor:
        """TensorFlow's `linspace` (float32): start, start + i * (stop - start) / (num - 1), stop."""
        if num == 1:
            return start.reshape(1)
        step = (stop - start) / torch.tensor(num - 1, dtype=start.dtype)
        inner = start + torch.arange(1, num - 1, dtype=start.dtype) * step
        return torch.cat([start.reshape(1), inner, stop.reshape(1)])

    @staticmethod
    def keras_window(window, length: int, dtype: torch.dtype) -> torch.Tensor:
        """TensorFlow's `hann_window`/`hamming_window(periodic=True)` as Keras's stft asks for them:
        a - b * cos(2 pi n / N), N = length for an even length and length - 1 for an odd one
        (TensorFlow's `periodic` applies to even lengths only)."""
        if length == 1:
            return torch.ones(length, dtype=dtype)
        a, b = (0.5, 0.5) if window == "hann" else (0.54, 0.46)
        n = torch.tensor(length if length % 2 == 0 else length - 1, dtype=dtype)
        angle = torch.tensor(2 * 3.141592653589793, dtype=dtype) * torch.arange(length, dtype=dtype) / n
        return a - b * torch.cos(angle)

    @staticmethod
    def keras_mel_matrix(
        num_mel_bins: int, num_spectrogram_bins: int, sampling_rate, lower_edge_hertz, upper_edge_hertz
    ) -> torch.Tensor:
        """Keras's `MelSpectrogram.linear_to_mel_weight_matrix` (HTK mel scale, triangles peaking at 1,
        the DC bin zero), in float32 as Keras computes it: (num_spectrogram_bins, num_mel_bins)."""

        def hertz_to_mel(hertz):
            return 1127.0 * tensorflow_log(1.0 + hertz / 700.0)

        float32 = torch.float32
        nyquist = torch.tensor(sampling_rate, dtype=float32) / 2.0
        linspace = KerasMelSpectrogram.tensorflow_linspace
        frequencies = linspace(torch.tensor(0.0), nyquist, num_spectrogram_bins)[1:]
        bins_mel = hertz_to_mel(frequencies).unsqueeze(1)
        edges = linspace(
            hertz_to_mel(torch.tensor(lower_edge_hertz, dtype=float32)),
            hertz_to_mel(torch.tensor(upper_edge_hertz, dtype=float32)),
            num_mel_bins + 2,
        )
        lower, center, upper = edges[:-2].unsqueeze(0), edges[1:-1].unsqueeze(0), edges[2:].unsqueeze(0)
        lower_slopes = (bins_mel - lower) / (center - lower)
        upper_slopes = (upper - bins_mel) / (upper - center)
        weights = torch.maximum(torch.tensor(0.0), torch.minimum(lower_slopes, upper_slopes))
        return F.pad(weights, (0, 0, 1, 0))

    def log10(self, x: torch.Tensor) -> torch.Tensor:
        """Keras's log10 (TensorFlow backend): log(x) / log(10)."""
        return tensorflow_log(x) / tensorflow_log(torch.tensor(10.0, dtype=x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output_dtype = x.dtype
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        half = self.fft_length // 2
        padded = F.pad(x.unsqueeze(1), (half, half), mode="reflect").squeeze(1)
        frames = padded.unfold(-1, self.fft_length, self.sequence_stride) * self.window_values.to(x.dtype)
        spectrum = torch.fft.rfft(frames, n=self.fft_length)
        power = torch.pow(torch.sqrt(spectrum.real**2 + spectrum.imag**2), self.mag_exp)
        mel = torch.matmul(power, self.mel_matrix.to(x.dtype))
        if self.power_to_db:
            mel = 10.0 * self.log10(torch.clamp(mel, min=self.min_power))
            reference = torch.clamp(torch.tensor(abs(self.ref_power), dtype=torch.float32), min=self.min_power)
            mel = mel - (10.0 * self.log10(reference)).to(x.dtype)
            mel = torch.maximum(mel, torch.amax(mel) - self.top_db)
        return mel.to(output_dtype)


class KerasSTFTSpectrogram(nn.Module):
    """Keras's STFTSpectrogram on Keras-layout signals ((N, T, C) channels_last, (N, C, T)
    channels_first): each channel convolved (stride frame_step, TensorFlow's `same` or `valid`
    padding) with the real and imaginary DFT kernels, torch Conv1d weights (F, 1, frame_length),
    then the `mode` (real, imag, angle, stft, psd, magnitude, log) and Keras's output layout;
    `epsilon` is Keras's backend epsilon, the floor of the power and the magnitude."""

    def __init__(
        self,
        mode,
        frame_length,
        frame_step,
        frequencies,
        padding="valid",
        expand_dims=False,
        data_format="channels_last",
        epsilon=1e-7,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.mode, self.frame_length, self.frame_step, self.frequencies = mode, frame_length, frame_step, frequencies
        self.padding, self.expand_dims, self.data_format, self.epsilon = padding, expand_dims, data_format, epsilon
        shape = (frequencies, 1, frame_length)
        if mode != "imag":
            self.real_weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        if mode != "real":
            self.imag_weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))

    def convolve(self, signals: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(N, C, T) -> (N, C, F, frames)."""
        channels, length = signals.shape[1], signals.shape[2]
        flat = signals.reshape(-1, 1, length)
        if self.padding == "same":  # TensorFlow's: the odd cell after
            frames = -(-length // self.frame_step)
            total = max((frames - 1) * self.frame_step + self.frame_length - length, 0)
            flat = F.pad(flat, (total // 2, total - total // 2))
        output = F.conv1d(flat, weight.to(signals.dtype), stride=self.frame_step)
        return output.reshape(-1, channels, output.shape[1], output.shape[2])

    def adjust(self, outputs: torch.Tensor) -> torch.Tensor:
        """(N, C, F, frames) in Keras's output layout."""
        if self.expand_dims:
            return outputs.permute(0, 3, 2, 1) if self.data_format == "channels_last" else outputs.transpose(2, 3)
        merged = outputs.reshape(outputs.shape[0], -1, outputs.shape[3])
        return merged.transpose(1, 2) if self.data_format == "channels_last" else merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        signals = x.transpose(1, 2) if self.data_format == "channels_last" else x
        if self.mode == "real":
            return self.adjust(self.convolve(signals, self.real_weight))
        if self.mode == "imag":
            return self.adjust(self.convolve(signals, self.imag_weight))
        real, imag = self.convolve(signals, self.real_weight), self.convolve(signals, self.imag_weight)
        if self.mode == "angle":
            return self.adjust(torch.atan2(imag, real))
        if self.mode == "stft":
            return self.adjust(torch.cat([real, imag], dim=2))
        power = torch.square(real) + torch.square(imag)
        if self.mode == "psd":
            return self.adjust(power + F.pad(power[:, :, 1:-1, :], (0, 0, 1, 1)))
        magnitude = self.adjust(torch.sqrt(torch.clamp(power, min=self.epsilon)))
        if self.mode == "magnitude":
            return magnitude
        return tensorflow_log(torch.clamp(magnitude, min=self.epsilon))


def tensorflow_cpu_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over a last axis of 256 float32 values (keepdim), added in the order TensorFlow's
    CPU kernel adds them (Eigen's vectorised reduction): 8-lane packets into 4 accumulators in turn
    (packet j into accumulator j % 4), the accumulators added in order, then the 8 lanes halved
    (0-3 + 4-7, ...). Each float32 rounding happens where TensorFlow's does."""
    packets = values.unflatten(-1, (8, 4, 8))  # (..., round, accumulator, lane)
    accumulators = packets[..., 0, :, :]
    for round_index in range(1, 8):
        accumulators = accumulators + packets[..., round_index, :, :]
    lanes = accumulators[..., 0, :]
    for accumulator in range(1, 4):
        lanes = lanes + accumulators[..., accumulator, :]
    while lanes.shape[-1] > 1:
        half = lanes.shape[-1] // 2
        lanes = lanes[..., :half] + lanes[..., half:]
    return lanes


class KerasCLAHE(nn.Module):
    """Keras's ContrastLimitedAdaptiveHistogramEqualization on (N, C, height, width) images, with
    TensorFlow's float32 roundings:
    - values in `value_range` are scaled to [0, 255] (unless it is (0, 255)) as TensorFlow's graph
      computes `(x - low) / (high - low) * 255`: times the float32 constant 255 * (1 / (high - low));
    - the image is padded symmetrically (mirrored, edge included) at the bottom and right to whole
      tiles of ceil(height / grid) x ceil(width / grid) pixels;
    - per tile and channel, a histogram of 256 bins: bin trunc(clip(x, 0, 255)); values at or
      above 2**31 (and NaN) in bin 0, where TensorFlow's int32 cast overflows;
    - bins clipped at clip_limit * tile pixels / 256 (when clip_limit > 0), the excess (summed in
      TensorFlow's order, `tensorflow_cpu_sum`) spread evenly over the 256 bins;
    - the cumulative histogram, summed one bin after another in float32 as TensorFlow's cumsum,
      mapped to [0, 255]: (cdf - cdf_min) * 255 / (tile pixels - cdf_min), 1 for a zero divisor;
    - each pixel's value trunc(clip(x, 0, 255)) looked up in the four nearest tiles' mappings
      (tile centres, edges repeated) and interpolated bilinearly;
    - scaled back to `value_range` (r * ((high - low) * (1 / 255)) + low), cast to x's dtype.
    Sizes are fixed at construction, so every index and weight is a constant buffer."""

    row_first: torch.Tensor  # buffers (register_buffer, in __init__'s loop)
    row_second: torch.Tensor
    row_weight: torch.Tensor
    row_weight_first: torch.Tensor
    column_first: torch.Tensor
    column_second: torch.Tensor
    column_weight: torch.Tensor
    column_weight_first: torch.Tensor

    def __init__(self, height, width, value_range=(0.0, 255.0), clip_limit=4.0, tile_grid_size=(8, 8)):
        super().__init__()
        self.height, self.width, self.value_range = height, width, tuple(value_range)
        self.clip_limit, self.tile_grid_size = clip_limit, tuple(tile_grid_size)
        grid_height, grid_width = self.tile_grid_size
        self.tile_height, self.tile_width = -(-height // grid_height), -(-width // grid_width)
        self.tile_pixels = self.tile_height * self.tile_width
        low, high = (torch.tensor(value, dtype=torch.float32) for value in self.value_range)
        self.rescales = tuple(self.value_range) != (0.0, 255.0)
        # Python floats holding float32 values: multiplying or adding them rounds as float32 does.
        self.low = low.item()
        self.to_bins = ((1 / (high - low)) * 255).item()
        self.from_bins = ((1 / torch.tensor(255.0)) * (high - low)).item()
        self.limit = torch.tensor(clip_limit * self.tile_pixels / 256.0, dtype=torch.float32).item()
        rows = self._corners(height, self.tile_height, grid_height)
        columns = self._corners(width, self.tile_width, grid_width)
        for name, (first, second, weight) in (("row", rows), ("column", columns)):
            self.register_buffer(f"{name}_first", first, persistent=False)
            self.register_buffer(f"{name}_second", second, persistent=False)
            self.register_buffer(f"{name}_weight", weight, persistent=False)
            self.register_buffer(f"{name}_weight_first", 1 - weight, persistent=False)

    @staticmethod
    def _corners(size, tile, grid):
        """For each pixel along an axis: its two nearest tile centres (tile indices, the edges
        repeated) and the second's float32 weight, as Keras computes them."""
        position = (torch.arange(size, dtype=torch.float32) - torch.tensor(tile / 2.0)) / torch.tensor(float(tile)) + 1
        first = torch.floor(position)
        weight = position - first
        second = (first + 1).clamp(0, grid + 1) - 1
        return (first.clamp(0, grid + 1) - 1).clamp(0, grid - 1).long(), second.clamp(0, grid - 1).long(), weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid_height, grid_width = self.tile_grid_size
        values = (x.float() - self.low) * self.to_bins if self.rescales else x
        padded = values
        pad_height, pad_width = grid_height * self.tile_height - self.height, grid_width * self.tile_width - self.width
        if pad_height:
            padded = torch.cat([padded, padded[:, :, self.height - pad_height :].flip(2)], 2)
        if pad_width:
            padded = torch.cat([padded, padded[:, :, :, self.width - pad_width :].flip(3)], 3)
        bins = torch.where(padded < 2**31, padded.clamp(0, 255), torch.zeros_like(padded)).long()
        batch, channels = x.shape[0], x.shape[1]
        tiles = bins.reshape(batch, channels, grid_height, self.tile_height, grid_width, self.tile_width)
        tiles = tiles.permute(0, 1, 2, 4, 3, 5).reshape(batch, channels, grid_height, grid_width, self.tile_pixels)
        histogram = torch.zeros(batch, channels, grid_height, grid_width, 256, dtype=torch.float32, device=x.device)
        histogram = histogram.scatter_add(-1, tiles, torch.ones_like(tiles, dtype=torch.float32))
        if self.clip_limit > 0:
            clipped = histogram.clamp(0, self.limit)
            histogram = clipped + tensorflow_cpu_sum(histogram - clipped) / 256.0
        running = list(histogram.unbind(-1))
        for bin_index in range(1, 256):
            running[bin_index] = running[bin_index - 1] + running[bin_index]
        cdf = torch.stack(running, -1)
        lowest = cdf.amin(-1, keepdim=True)
        divisor = self.tile_pixels - lowest
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        mapping = ((cdf - lowest) * 255.0 / divisor).clamp(0, 255).reshape(batch, channels, -1)
        pixels = values.clamp(0, 255).long()

        def lookup(rows, columns):
            index = (rows[:, None] * grid_width + columns[None, :]) * 256 + pixels
            return torch.gather(mapping, 2, index.reshape(batch, channels, -1)).reshape(pixels.shape)

        top = (
            lookup(self.row_first, self.column_first) * self.column_weight_first
            + lookup(self.row_first, self.column_second) * self.column_weight
        )
        bottom = (
            lookup(self.row_second, self.column_first) * self.column_weight_first
            + lookup(self.row_second, self.column_second) * self.column_weight
        )
        result = top * self.row_weight_first[:, None] + bottom * self.row_weight[:, None]
        if self.rescales:
            result = result * self.from_bins + self.low
        return result.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.height}, {self.width}, value_range={self.value_range}, clip_limit={self.clip_limit}, "
            f"tile_grid_size={self.tile_grid_size}"
        )


# -- FarmHash and SipHash over the decimal form of int64 values (Keras's Hashing) ---------------
# torch has no uint64 arithmetic: these hold unsigned 64-bit words in int64 tensors, where `+`,
# `*` and `^` give the same bits (two's complement wraps around); only right shifts, rotations and
# the modulo need the helpers below. (Constants live inside the functions: generated code copies
# functions, not module constants.)


def signed64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x >> bits as an unsigned shift (zeros come in at the top)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def rotate_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return shift_right(x, bits) | (x << (64 - bits))


def unsigned_remainder(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """x mod divisor, x read as unsigned (divisor below 2**62): a negative x stands for x + 2**64."""
    remainder = torch.remainder(x, divisor)
    carry = (1 << 64) % divisor  # what 2**64 adds, mod divisor
    wrapped = torch.where(remainder >= divisor - carry, remainder - (divisor - carry), remainder + carry)
    return torch.where(x < 0, wrapped, remainder)


def decimal_bytes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ASCII bytes of each int64's decimal form (TensorFlow's `as_string`), as int64 values
    (..., 28), zero past each string's end; and each string's length (at most 20:
    "-9223372036854775808")."""
    width = 20
    negative = x < 0
    digits, rest, count = [], x, torch.ones_like(x)
    for _ in range(width - 1):  # least significant first; no negation, so int64 min fits
        digits.append(torch.fmod(rest, 10).abs())
        rest = torch.div(rest, 10, rounding_mode="trunc")
        count = count + (rest != 0).long()
    digit_values = torch.stack(digits, -1)
    length = count + negative.long()
    position = torch.arange(width + 8, device=x.device)
    place = (length.unsqueeze(-1) - 1 - position).clamp(0, width - 2)  # digit shown at each position
    characters = torch.gather(digit_values, -1, place) + ord("0")
    characters = torch.where((position == 0) & negative.unsqueeze(-1), ord("-"), characters)
    return torch.where(position < length.unsqueeze(-1), characters, 0), length


def fetch(text: torch.Tensor, offset: torch.Tensor, size: int = 8) -> torch.Tensor:
    """The little-endian word of `size` bytes at `offset` (per element) of `text`."""
    word = torch.zeros_like(offset)
    for index in range(size):
        at = (offset + index).clamp(0, text.shape[-1] - 1)  # a branch not taken may read outside
        byte = torch.gather(text, -1, at.unsqueeze(-1)).squeeze(-1)
        word = word | (byte << (8 * index))
    return word


def farm_hash_len16(u: torch.Tensor, v: torch.Tensor, mul: torch.Tensor) -> torch.Tensor:
    a = (u ^ v) * mul
    a = a ^ shift_right(a, 47)
    b = (v ^ a) * mul
    b = b ^ shift_right(b, 47)
    return b * mul


def fingerprint64(text: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """FarmHash's Fingerprint64 (farmhashna::Hash64, TensorFlow's `Fingerprint64`) of strings of 1
    to 32 bytes (`decimal_bytes`): its 1-3, 4-7, 8-16 and 17-32 byte branches, each computed for
    every element, the one for its length kept."""
    k0, k1, k2 = signed64(0xC3A5C85C97CB3127), signed64(0xB492B66FBE98F273), signed64(0x9AE16A3B2F90404F)
    zero = torch.zeros_like(length)
    mul = k2 + length * 2
    # 1 to 3 bytes
    y = fetch(text, zero, 1) + (fetch(text, length >> 1, 1) << 8)
    z = length + (fetch(text, length - 1, 1) << 2)
    short = y * k2 ^ z * k0
    short = (short ^ shift_right(short, 47)) * k2
    # 4 to 7 bytes
    medium = farm_hash_len16(length + (fetch(text, zero, 4) << 3), fetch(text, length - 4, 4), mul)
    # 8 to 16 bytes
    a = fetch(text, zero) + k2
    b = fetch(text, length - 8)
    long = farm_hash_len16(rotate_right(b, 37) * mul + a, (rotate_right(a, 25) + b) * mul, mul)
    # 17 to 32 bytes
    a = fetch(text, zero) * k1
    b = fetch(text, zero + 8)
    c = fetch(text, length - 8) * mul
    d = fetch(text, length - 16) * k2
    longer = farm_hash_len16(rotate_right(a + b, 43) + rotate_right(c, 30) + d, a + rotate_right(b + k2, 18) + c, mul)
    return torch.where(length < 4, short, torch.where(length < 8, medium, torch.where(length <= 16, long, longer)))


def sip_round(v0, v1, v2, v3):
    v0 = v0 + v1
    v1 = rotate_right(v1, 64 - 13) ^ v0
    v0 = rotate_right(v0, 32)
    v2 = v2 + v3
    v3 = rotate_right(v3, 64 - 16) ^ v2
    v0 = v0 + v3
    v3 = rotate_right(v3, 64 - 21) ^ v0
    v2 = v2 + v1
    v1 = rotate_right(v1, 64 - 17) ^ v2
    v2 = rotate_right(v2, 32)
    return v0, v1, v2, v3


def sip_hash(text: torch.Tensor, length: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """SipHash-2-4 keyed by two 64-bit words (TensorFlow's `StrongKeyedHash`, highwayhash's
    SipHash) of strings of at most 23 bytes: the 8-byte blocks each element has, then the last
    one, its remaining bytes and its length in the top byte."""
    k0, k1 = signed64(key[0] % (1 << 64)), signed64(key[1] % (1 << 64))
    v0 = torch.full_like(length, k0 ^ signed64(0x736F6D6570736575))
    v1 = torch.full_like(length, k1 ^ signed64(0x646F72616E646F6D))
    v2 = torch.full_like(length, k0 ^ signed64(0x6C7967656E657261))
    v3 = torch.full_like(length, k1 ^ signed64(0x7465646279746573))
    blocks = length >> 3
    for block in range(3):  # strings of at most 23 bytes: 0, 1 or 2 full blocks, then the last
        word = fetch(text, torch.full_like(length, 8 * block))
        last = blocks == block
        word = torch.where(last, word | (length << 56), word)
        mixed = v0, v1, v2, v3 ^ word
        mixed = sip_round(*sip_round(*mixed))
        mixed = (mixed[0] ^ word,) + mixed[1:]
        keep = block <= blocks  # the blocks of each string, its last included
        v0, v1, v2, v3 = (torch.where(keep, new, old) for new, old in zip(mixed, (v0, v1, v2, v3)))
    v2 = v2 ^ 0xFF
    for _ in range(4):
        v0, v1, v2, v3 = sip_round(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def hash_integers(x: torch.Tensor, num_bins: int, salt: tuple[int, int] | None = None) -> torch.Tensor:
    """TensorFlow's `to_hash_bucket_fast(as_string(x), num_bins)` (FarmHash Fingerprint64), or with
    a salt `to_hash_bucket_strong` (SipHash-2-4): each int64's decimal form hashed, the unsigned
    hash mod num_bins."""
    text, length = decimal_bytes(x)
    hashed = fingerprint64(text, length) if salt is None else sip_hash(text, length, salt)
    return unsigned_remainder(hashed, num_bins)


def tensorflow_int64(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's cast to int64 (x86): floats rounded toward zero; NaN, infinities and floats
    outside int64 give int64's minimum. Integers are widened."""
    if not x.is_floating_point():
        return x.long()
    inside = torch.isfinite(x) & (x.double().abs() < 2.0**63)
    return torch.where(inside, torch.where(inside, x, 0).long(), -(1 << 63))


class KerasHashing(nn.Module):
    """Keras's Hashing on integers or floats (floats cast to int64 first, `tensorflow_int64`): each
    value's decimal form hashed into `num_bins` bins (`hash_integers`: FarmHash Fingerprint64, or
    SipHash-2-4 keyed by `salt`). With a `mask_value` (and more than one bin) the value equal to it
    (compared before the cast) gets bin 0 and the others are hashed into num_bins - 1 bins from 1.
    Bins are returned as `output_dtype` or encoded (`keras_encode`) over the last axis."""

    def __init__(self, num_bins, mask_value=None, salt=None, output_mode="int", output_dtype=torch.int64):
        super().__init__()
        self.num_bins, self.mask_value, self.salt = num_bins, mask_value, None if salt is None else tuple(salt)
        self.output_mode, self.output_dtype = output_mode, output_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masked = self.mask_value is not None and self.num_bins > 1
        bins = hash_integers(tensorflow_int64(x), self.num_bins - masked, self.salt)
        if masked:  # floats compare in their own type, integers as int64 (TensorFlow's `equal`)
            mask = x == self.mask_value if x.is_floating_point() else x.long() == self.mask_value
            bins = torch.where(mask, 0, bins + 1)
        if self.output_mode == "int":
            return bins.to(self.output_dtype)
        return keras_encode(bins, self.num_bins, self.output_mode, self.output_dtype)


def fingerprint_cat64(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """TensorFlow's `FingerprintCat64`: two 64-bit fingerprints combined into one."""

    def shift_mix(value):
        return value ^ shift_right(value, 47)

    mul = signed64(0xC6A4A7935BD1E995)
    result = first ^ mul
    result = result ^ shift_mix(second * mul) * mul
    result = shift_mix(result * mul) * mul
    return shift_mix(result)


class KerasHashedCrossing(nn.Module):
    """Keras's HashedCrossing on integer features, each (N,) or (N, 1) (TensorFlow's
    `sparse.cross_hashed`): the int64 values themselves (not their decimal forms) folded with
    `fingerprint_cat64` from TensorFlow's default key 0xDECAFCAFFE, in input order, the unsigned result mod num_bins; as
    `output_dtype`, or one-hot (N, num_bins)."""

    def __init__(self, num_bins, output_mode="int", output_dtype=torch.int64):
        super().__init__()
        self.num_bins, self.output_mode, self.output_dtype = num_bins, output_mode, output_dtype

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        crossed = torch.full_like(features[0], 0xDECAFCAFFE, dtype=torch.int64)
        for feature in features:
            crossed = fingerprint_cat64(crossed, feature.long())
        bins = unsigned_remainder(crossed, self.num_bins)
        if self.output_mode == "int":
            return bins.to(self.output_dtype)
        bins = bins.reshape(bins.shape[0])
        return (bins.unsqueeze(-1) == torch.arange(self.num_bins, device=bins.device)).to(self.output_dtype)


class KerasDropout(nn.Module):
    """Keras's dropout with a `noise_shape` whose 1s share one draw (SpatialDropout2D/3D with
    channels_first, whose channels are not torch's dim 1; keras.applications' StochasticDepth, one
    draw per sample): in training each draw drops with probability `rate` and the kept values are
    scaled by 1 / (1 - rate), one draw shared along `shared_dims`; in eval mode the identity."""

    def __init__(self, rate: float, shared_dims: tuple[int, ...]) -> None:
        super().__init__()
        self.rate, self.shared_dims = rate, shared_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        if self.rate == 1:  # Keras returns zeros
            return torch.zeros_like(x)
        shape = [1 if dim in self.shared_dims else size for dim, size in enumerate(x.shape)]
        keep = torch.rand(shape, device=x.device) >= self.rate
        return torch.where(keep, x * (1 / (1 - self.rate)), 0)


class KerasGaussianNoise(nn.Module):
    """Keras's GaussianNoise: in training adds noise drawn from N(0, stddev^2) to each value; in
    eval mode the identity (torch has no such module)."""

    def __init__(self, stddev: float) -> None:
        super().__init__()
        self.stddev = stddev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x + torch.randn_like(x) * self.stddev


class KerasGaussianDropout(nn.Module):
    """Keras's GaussianDropout: in training multiplies each value by noise drawn from
    N(1, rate / (1 - rate)); in eval mode the identity (torch has no such module)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * (1 + torch.randn_like(x) * (self.rate / (1 - self.rate)) ** 0.5)


class KerasActivityRegularization(nn.Module):
    """Keras's ActivityRegularization: passes its input on. Keras adds a loss on that input in
    training, `(l1 * sum(|x|) + l2 * sum(x^2)) / batch size`; torch has no layer losses, so in
    training this keeps it in `self.penalty` for the training step to add (None in eval mode)."""

    def __init__(self, l1: float, l2: float) -> None:
        super().__init__()
        self.l1, self.l2 = l1, l2
        self.penalty: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.penalty = None
        if self.training:
            penalty = torch.zeros((), dtype=x.dtype, device=x.device)
            if self.l1:
                penalty = penalty + self.l1 * torch.sum(torch.abs(x))
            if self.l2:
                penalty = penalty + self.l2 * torch.sum(torch.square(x))
            self.penalty = penalty / max(x.shape[0], 1)  # an empty batch's is 0, as Keras's
        return x


class NAMESPACES:
    """Where the exchange's table of activations finds its torch functions (`torch`, `F`, `helpers`)
    outside a torch graph builder (the seed MLP's trainer)."""

    torch, F = torch, F
    helpers = __import__(__name__, fromlist=["identity"])
