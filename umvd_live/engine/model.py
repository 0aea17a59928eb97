"""The UMVD network (Aiyetigbo et al., CVPRW 2024) and its presets.

A window of N frames goes in; the denoised centre frame comes out. A per-frame feature generator
G (shared weights) maps each frame to features; a fixed temporal filter gamma weights them, with
the centre frame's weight exactly 0, so the output never sees the frame it must predict. That
blindness is what lets the network train on noisy frames alone: the loss compares the output
with the noisy centre frame, whose noise is independent of the inputs.

An extension beyond the paper (`ModelSpec.context`, used by `lite`, off in `paper`): D may also
take the means of a few blocks of earlier frames, beyond the window's reach. A nearly static
scene is then averaged over tens of frames at the cost of one input channel per block, where a
wider window would cost G features and D input for every added frame. The blocks never contain
the centre frame (`window.context_blocks`), so blindness holds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

SkipSource = Literal["features", "enc1"]
Padding = Literal["zeros", "reflect", "replicate", "circular"]  # torch's Conv2d padding_mode


@dataclass(frozen=True)
class ModelSpec:
    """Widths and depths of one UMVD network; `paper` and `lite` are two instances of it."""

    window: int = 7
    gamma_power: float = 64.0  # l in gamma(d); the reference training script's value
    gamma_floor: float = 0.0  # m in gamma(d); 0 keeps the centre weight exactly 0
    g_channels: int = 21
    g_layers: int = 3
    enc1: tuple[int, int] = (5, 48)  # (convs, channels) at full resolution, then 2x max-pool
    enc2: tuple[int, int] = (5, 48)  # at 1/2, then 2x max-pool
    mid: tuple[int, int] = (5, 96)  # bottleneck at 1/4: in -> mid x (convs-2) -> enc2 width
    dec2: tuple[int, int] = (6, 96)  # at 1/2, after concatenating enc1's pooled output
    dec1: tuple[int, int] = (6, 96)  # at full resolution, after concatenating `dec1_skip`
    dec1_skip: SkipSource = "features"  # the paper concatenates the weighted G features
    head: tuple[int, ...] = (384, 96)  # hidden widths of the 1x1 head
    bias: bool = False
    padding: Padding = "replicate"  # the reference's; "zeros" is fused into the convolution (faster)
    context: tuple[int, ...] = ()  # lengths of the blocks of earlier frames whose means D also sees

    def __post_init__(self) -> None:
        if self.window < 3 or self.window % 2 == 0:
            raise ValueError(f"window must be odd and >= 3, got {self.window}")
        if any(n < 1 for n in self.context):
            raise ValueError(f"context blocks need at least 1 frame each, got {self.context}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**fields)


def paper_spec(window: int = 7) -> ModelSpec:
    """The published architecture: 1,786,191 parameters at N = 7."""
    return ModelSpec(window=window)


#: lite's context blocks: the means of the 8 frames before the window, the 24 before those and the
#: 64 before those: 3.2 s of history at 30 Hz (docs/benchmarks.md has the sizing runs).
LITE_CONTEXT = (8, 24, 64)


def lite_spec(window: int = 7) -> ModelSpec:
    """Same structure, sized for a live 30 Hz stream on a 2-core CPU at 256x256 while training.

    Capacity sits where it is cheap: G is thin because its output is computed once per frame and
    reused by the N windows it belongs to, but the window stacks N of them at full resolution; the
    full-resolution stages are one or two thin convolutions, and width grows at 1/2 and 1/4.
    """
    return ModelSpec(
        window=window,
        g_channels=4,
        g_layers=2,
        enc1=(1, 8),
        enc2=(2, 24),
        mid=(3, 32),
        dec2=(2, 24),
        dec1=(1, 8),
        dec1_skip="enc1",
        head=(16,),
        bias=True,
        padding="zeros",
        context=LITE_CONTEXT,
    )


def fast_spec(window: int = 7) -> ModelSpec:
    """lite with its ½- and ¼-resolution stages thinned (one convolution each side, 16 and 24
    channels): a pass of D costs 30 instead of 56-68 ms per 512² frame on one CPU thread (bf16;
    tools/bench_stages.py). For live
    streams too large for lite to keep up with on a small CPU: at 512² and 30 Hz on 2 cores it
    gives 30.0 fps out at +14.0 dB (27.5 before the fused convolutions), where lite gave 21.4 fps at
    +15.9 dB (docs/benchmarks.md). The
    full-resolution stages stay as in lite: thinning those made training collapse."""
    return replace(lite_spec(window), enc2=(1, 16), mid=(2, 24), dec2=(1, 16))


PRESETS = {"paper": paper_spec, "lite": lite_spec, "fast": fast_spec}

#: Live streams on a CPU from this many pixels per frame get `fast` from `auto`.
FAST_FROM_PIXELS = 512 * 512


def resolve_preset(preset: str, device: torch.device, height: int, width: int, live: bool = False) -> str:
    """`auto`: the paper network on a GPU, lite on a CPU (paper costs ~1 s per 256² frame on 2
    CPU cores), and lite on a GPU too for frames too large to keep up with (>= 2048²). A live
    stream on a CPU with frames of 512² or more gets fast, which keeps up better there; a file
    (`live=False`) keeps lite's quality, since it need not keep pace."""
    if preset != "auto":
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose auto, {', '.join(PRESETS)}")
        return preset
    if device.type == "cuda" and height * width < 2048 * 2048:
        return "paper"
    if device.type == "cpu" and live and height * width >= FAST_FROM_PIXELS:
        return "fast"
    return "lite"


def gamma_weights(window: int, power: float = 64.0, floor: float = 0.0) -> torch.Tensor:
    """gamma(d) = m + (1 - m)(1 - (1 - d/k)^l), d = |t - centre|, k = N // 2; gamma(0) = m."""
    k = window // 2
    d = torch.arange(window, dtype=torch.float64).sub(k).abs()
    gamma = floor + (1.0 - floor) * (1.0 - (1.0 - d / k) ** power)
    return gamma.float()


class ConvReLU(nn.Sequential):
    """A 3x3 convolution and its ReLU (the modules ``0`` and ``1``, as a plain Sequential holds them).

    Why not a plain Sequential: on the CPU, outside autograd, both run as one oneDNN call, the
    fused kernel torch's own compiler emits for this pair, so the ReLU is no second pass over the
    output. At 512² that pass was 15 % of a pass of `fast`'s D and the fused call gives the same
    numbers (docs/benchmarks.md, "512² at 30 fps"). Training, a GPU, a padding other than zeros,
    or a torch without the kernel run the two modules as usual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fused_sequence(self, x)


#: Whether torch's fused oneDNN convolution + ReLU works here (None: not tried yet).
_FUSED_WORKS: bool | None = None


def _fused_sequence(modules: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``modules`` in turn, each convolution followed by a ReLU fused with it where it can be."""
    layers = list(modules)
    i = 0
    while i < len(layers):
        layer = layers[i]
        if (i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU) and isinstance(layer, nn.Conv2d)
                and _fusable(x, layer) and (fused := _fused_conv_relu(x, layer)) is not None):
            x, i = fused, i + 2
            continue
        x, i = layer(x), i + 1
    return x


def _fusable(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """On the CPU, outside autograd and outside `torch.compile` (which fuses the pair itself)."""
    return (_FUSED_WORKS is not False and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not _compiling() and conv.padding_mode == "zeros" and conv.groups == 1)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return bool(torch._dynamo.is_compiling())  # torch < 2.3


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype CPU autocast casts a convolution to, or None where it is off."""
    try:
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    except TypeError:  # torch < 2.4: the CPU's own functions
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def _fused_conv_relu(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor | None = None) -> torch.Tensor | None:
    """relu(conv(x)) in one oneDNN call (with ``weight`` in place of the convolution's own, where
    given), cast as autocast would cast it; None where torch lacks it."""
    global _FUSED_WORKS
    dtype = _cpu_autocast_dtype() or x.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        return None
    weight = conv.weight if weight is None else weight
    try:
        out = torch.ops.mkldnn._convolution_pointwise(
            x.to(dtype), weight.to(dtype), None if conv.bias is None else conv.bias.to(dtype),
            list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, "relu", [None], "")
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        _FUSED_WORKS = False
        log.debug("no fused convolution + ReLU in this torch (%s): the two run apart", exc)
        return None
    _FUSED_WORKS = True
    return out


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pooling, stride 2. On the CPU outside autograd, the maximum of the four strided
    quarters: the same numbers in a third of torch's pooling time at 512² (which also computes
    the indices a backward pass would need)."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or x.shape[-1] % 2 or x.shape[-2] % 2 or _compiling():
        return F.max_pool2d(x, 2)
    top = torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2])
    return torch.maximum(top, torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]), out=top)


def _conv(cin: int, cout: int, spec: ModelSpec) -> ConvReLU:
    return ConvReLU(nn.Conv2d(cin, cout, 3, padding=1, padding_mode=spec.padding, bias=spec.bias),
                    nn.ReLU(inplace=True))


def _stack(cin: int, convs: int, cout: int, spec: ModelSpec) -> nn.Sequential:
    return nn.Sequential(*[_conv(cin if i == 0 else cout, cout, spec) for i in range(convs)])


def _stack_on(stack: nn.Sequential, x: torch.Tensor, channels: list[int] | None) -> torch.Tensor:
    """``stack`` on an input that holds only ``channels`` of the input channels it was built for
    (all of them where None): its first convolution reads just those columns of its weight, which
    gives the same numbers where the channels left out are zero."""
    if channels is None:
        return stack(x)
    conv = first_conv(stack)
    weight = conv.weight[:, channels]
    out = _fused_conv_relu(x, conv, weight) if _fusable(x, conv) else None
    if out is None:
        out = F.relu(conv._conv_forward(x, weight, conv.bias))
    for block in list(stack)[1:]:
        out = block(out)
    return out


def first_conv(stack: nn.Sequential) -> nn.Conv2d:
    """The convolution of a stack's first block (the one that reads the stack's input)."""
    return next(m for m in stack.modules() if isinstance(m, nn.Conv2d))


class FeatureGenerator(nn.Module):
    """G: the per-frame feature extractor, shared by every frame of the window."""

    def __init__(self, spec: ModelSpec, in_channels: int = 1):
        super().__init__()
        self.body = _stack(in_channels, spec.g_layers, spec.g_channels, spec)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.body(frames)


class DenoiserUNet(nn.Module):
    """D: a two-level U-Net from the gamma-weighted, concatenated features to the centre frame."""

    def __init__(self, spec: ModelSpec, out_channels: int = 1):
        super().__init__()
        cin = spec.window * spec.g_channels + len(spec.context) * out_channels
        (n1, c1), (n2, c2), (nm, cm), (nd2, cd2), (nd1, cd1) = (
            spec.enc1, spec.enc2, spec.mid, spec.dec2, spec.dec1,
        )
        self.skip = spec.dec1_skip
        self.enc1 = _stack(cin, n1, c1, spec)
        self.enc2 = _stack(c1, n2, c2, spec)
        if nm < 2:
            raise ValueError("the bottleneck needs at least 2 convolutions")
        self.mid = nn.Sequential(_conv(c2, cm, spec), *[_conv(cm, cm, spec) for _ in range(nm - 2)],
                                 _conv(cm, c2, spec))
        self.dec2 = _stack(c2 + c1, nd2, cd2, spec)
        skip_channels = cin if spec.dec1_skip == "features" else c1
        self.dec1 = _stack(cd2 + skip_channels, nd1, cd1, spec)
        widths = (cd1, *spec.head)
        head: list[nn.Module] = []
        for a, c in zip(widths[:-1], widths[1:]):
            head += [nn.Conv2d(a, c, 1, bias=spec.bias), nn.ReLU(inplace=True)]
        head.append(nn.Conv2d(widths[-1], out_channels, 1, bias=spec.bias))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor, channels: list[int] | None = None) -> torch.Tensor:
        """``channels``: the input channels ``x`` holds, where it leaves out channels that are zero
        (all of them where None)."""
        e1_full = _stack_on(self.enc1, x, channels)
        e1 = max_pool2(e1_full)
        e2 = max_pool2(self.enc2(e1))
        m = self.mid(e2)
        d2 = self.dec2(torch.cat([F.interpolate(m, scale_factor=2.0, mode="nearest"), e1], 1))
        up = F.interpolate(d2, scale_factor=2.0, mode="nearest")
        if self.skip == "features":
            kept = None if channels is None else list(range(up.shape[1])) + [up.shape[1] + c for c in channels]
            d1 = _stack_on(self.dec1, torch.cat([up, x], 1), kept)
        else:
            d1 = self.dec1(torch.cat([up, e1_full], 1))
        return _fused_sequence(self.head, d1)


class UMVDNet(nn.Module):
    """(B, N, C, H, W) windows -> (B, C, H, W) centre frames, blind to the centre frame."""

    def __init__(self, spec: ModelSpec, channels: int = 1):
        super().__init__()
        self.spec = spec
        self.channels = channels
        self.G = FeatureGenerator(spec, channels)
        self.D = DenoiserUNet(spec, channels)
        gamma = gamma_weights(spec.window, spec.gamma_power, spec.gamma_floor)
        self.register_buffer("gamma", gamma)
        self._gammas = gamma.tolist()  # the same weights as numbers (fixed), read on the host
        # D's input channels that are not always zero: a frame weighted by gamma 0 (the centre,
        # at gamma_floor 0) is left out of D's input rather than multiplied by 0 and convolved,
        # 4 of lite's and fast's 31 channels (docs/benchmarks.md, "The centre left out of D's input").
        g = spec.g_channels
        held = [i * g + c for i, weight in enumerate(self._gammas) if weight != 0.0 for c in range(g)]
        held += range(spec.window * g, spec.window * g + len(spec.context) * channels)
        self._held: list[int] | None = held if len(held) < first_conv(self.D.enc1).in_channels else None

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """G for a batch of single frames (B, C, H, W) -> (B, F, H, W); cacheable per frame."""
        return self.G(frames)

    def denoise_features(self, feats: Sequence[torch.Tensor], context: torch.Tensor | None = None) -> torch.Tensor:
        """The N per-frame features of each window, N tensors (B, F, H, W) [+ (B, M, C, H, W)
        context] -> (B, C, H, W). Taken frame by frame, as G made them (channels-last): a
        stacked window would cost one more pass over all of them."""
        if len(feats) != self.spec.window:
            raise ValueError(f"expected the features of {self.spec.window} frames, got {len(feats)}")
        h, w = feats[0].shape[-2:]
        # Multiplying by a weight of exactly 1 (every gamma but the centre's, in float32) would
        # be a pass over the features for nothing.
        parts = [x.permute(0, 2, 3, 1) if g == 1.0 else x.permute(0, 2, 3, 1) * g
                 for x, g in zip(feats, self._gammas) if g != 0.0]
        if self.spec.context:
            m = len(self.spec.context)
            if context is None or context.shape[1] != m:
                got = None if context is None else context.shape[1]
                raise ValueError(f"this network takes {m} context block means, got {got}")
            parts += [context[:, j].permute(0, 2, 3, 1).to(parts[0].dtype) for j in range(m)]
        # Built channels-last (B, H, W, channels) in one copy: D's convolutions run on that layout.
        x = torch.cat(parts, 3).permute(0, 3, 1, 2)
        # Two 2x poolings need sides divisible by 4: pad by replication, then crop.
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate").contiguous(memory_format=torch.channels_last)
        return self.D(x, self._held)[..., :h, :w]

    def forward(self, windows: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """`context`: the (B, M, C, H, W) block means, for a spec with context blocks; without
        it (a bare window, no history), every block stands in as the mean of the centre's
        neighbours, as at the very start of a stream."""
        b, n, c, h, w = windows.shape
        if n != self.spec.window:
            raise ValueError(f"expected windows of {self.spec.window} frames, got {n}")
        if self.spec.context and context is None:
            k = n // 2
            neighbours = torch.cat([windows[:, :k], windows[:, k + 1 :]], 1).mean(1, keepdim=True)
            context = neighbours.expand(b, len(self.spec.context), c, h, w)
        feats = self.features(windows.reshape(b * n, c, h, w)).reshape(b, n, -1, h, w)
        return self.denoise_features([feats[:, i] for i in range(n)], context)


def reach_rows(spec: ModelSpec) -> int:
    """How many rows of D's input, on each side, can reach one row of its output: an upper bound,
    rounded up to a multiple of 4 so that a band starting there pools on the same grid as the
    whole frame. Walked back from the output: dec1's convolutions at full resolution, the nearest
    upsampling of dec2 (x2, +1), dec2's convolutions at ½, the bottleneck at ¼ (x2, +1 for its
    upsampling, +1 for the pooling into it), enc2's convolutions, then the pooling (+1) and
    enc1's convolutions at full resolution. `fast`: 20 rows, `lite`: 28, `paper`: 60."""
    (n1, _), (n2, _), (nm, _), (nd2, _), (nd1, _) = spec.enc1, spec.enc2, spec.mid, spec.dec2, spec.dec1
    half = nd2 + 2 * nm + 2 + n2
    full = nd1 + 2 * half + 2 + n1
    return -(-full // 4) * 4


@dataclass(frozen=True)
class RowBand:
    """Output rows ``[lo, hi)`` of D, computed from input rows ``[start, stop)`` alone."""

    start: int
    stop: int
    lo: int
    hi: int

    @classmethod
    def around(cls, lo: int, hi: int, reach: int, height: int) -> RowBand:
        """Output rows ``[lo, hi)`` of a network whose output row sees ``reach`` input rows each side."""
        return cls(max(0, lo - reach), min(height, hi + reach), lo, hi)

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        """The band's own rows of a pass over its input rows (..., stop - start, W)."""
        return image[..., self.lo - self.start:self.hi - self.start, :]


#: The most extra work splitting a pass into bands may add (the rows their overlaps repeat).
BAND_OVERHEAD = 0.125


def row_bands(spec: ModelSpec, height: int, parts: int) -> list[RowBand]:
    """One pass of D over ``height`` rows as ``parts`` bands that give the same numbers (each
    with `reach_rows` of its neighbours' rows around it, cut on the 4-row grid of the pooling):
    passes of one window that run side by side. One band, the whole frame, where the repeated
    rows would add more than `BAND_OVERHEAD` to the work, or the frame is too short to cut."""
    reach = reach_rows(spec)
    cuts = [0] + [round(height * i / parts / 4) * 4 for i in range(1, parts)] + [height]
    whole = [RowBand(0, height, 0, height)]
    if parts < 2 or any(b - a < 4 for a, b in zip(cuts, cuts[1:])) or \
            2 * reach * (parts - 1) > BAND_OVERHEAD * height:
        return whole
    return [RowBand.around(lo, hi, reach, height) for lo, hi in zip(cuts, cuts[1:])]


def build_model(preset: str, window: int = 7) -> UMVDNet:
    return UMVDNet(PRESETS[preset](window))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
