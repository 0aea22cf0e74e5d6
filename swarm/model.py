"""A small Llama-style decoder, split into pipeline stages.

The network is ``Embedding -> Stage_0 -> ... -> Stage_{S-1} -> Head``:

* :class:`Embedding` maps byte tokens ``LongTensor[B, T]`` to hidden states ``FloatTensor[B, T, D]``;
* each :class:`Stage` holds a contiguous span of transformer :class:`Block` s and maps ``[B, T, D] -> [B, T, D]``;
* :class:`Head` applies the final RMSNorm and an (untied) LM projection, returning logits ``[B, T, V]`` or the
  mean cross-entropy against ``targets``.

In the swarm, the trusted trainer runs the embedding and the head; untrusted peers run the stages.

Blocks are pre-norm residual (``h = h + attn(norm(h)); h = h + mlp(norm(h))``) with RMSNorm, causal multi-head
attention with rotary position embeddings (RoPE) and a SwiGLU MLP, as in Llama.

Initialisation is deterministic and independent of the split: every piece draws its weights from a private
``torch.Generator`` seeded from ``(seed, name)``, where ``name`` is ``"embedding"``, ``"head"`` or ``"block/<j>"``
for the *global* block index ``j``. So ``build_pipeline(cfg, 1, seed)`` and ``build_pipeline(cfg, 4, seed)`` hold
bit-identical weights, and a peer can build its own ``Stage(cfg, start, end, seed=seed)`` without seeing the rest.
The global torch RNG is never consumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ModelConfig",
    "PRESETS",
    "resolve_config",
    "resolve_device",
    "split_layers",
    "RMSNorm",
    "Attention",
    "SwiGLU",
    "Block",
    "Embedding",
    "Stage",
    "Head",
    "build_pipeline",
    "count_parameters",
    "derive_seed",
    "apply_rope",
]

INIT_STD = 0.02


# ---------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the decoder. Validated on construction (``ValueError`` on inconsistent values)."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 8
    n_heads: int = 4
    d_ff: int = 344  # SwiGLU hidden width (~8/3 * d_model, rounded)
    seq_len: int = 64
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    # multiply the token embeddings by sqrt(d_model) (as Vaswani et al. and Gemma do). Not for training's sake: it
    # puts the residual stream that enters the first untrusted stage at the scale of the blocks' updates, so that the
    # validator's input-output coupling checks (cosine, gain) see stage 1 as they see every other stage. With the raw
    # N(0, 0.02) embeddings the first stage's output is ~10x its input and its input gradient is dominated by the
    # RMSNorm Jacobian (1/rms ~ 50): stage-1 noise, replay and sign attacks went unseen (README, "Stage 1")
    scale_embedding: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head dimension d_model/n_heads = {self.head_dim} must be even for RoPE")
        if not isinstance(self.scale_embedding, bool):
            raise ValueError(f"ModelConfig.scale_embedding must be a bool, got {self.scale_embedding!r}")
        if not self.rope_base > 0 or not self.norm_eps > 0:
            raise ValueError("rope_base and norm_eps must be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        """Plain-dict view (JSON-serialisable); ``ModelConfig.from_dict(cfg.to_dict()) == cfg``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # unit tests: runs in milliseconds
    "tiny": ModelConfig(d_model=64, n_layers=4, n_heads=4, d_ff=172, seq_len=32),
    # default for experiments: minutes on 2 CPU cores
    "small": ModelConfig(d_model=128, n_layers=8, n_heads=4, d_ff=344, seq_len=64),
    # GPU presets
    "base": ModelConfig(d_model=512, n_layers=16, n_heads=8, d_ff=1376, seq_len=256),
    "large": ModelConfig(d_model=1024, n_layers=24, n_heads=16, d_ff=2752, seq_len=512),
}


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto``: CUDA when present, else the CPU; else ``name`` as a torch device. ``ValueError`` for a name torch
    does not know, or for a CUDA device this machine does not have (rather than an error at the first ``.to``)."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {str(name)!r}: use auto, cpu, cuda or cuda:N ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(name)!r}: CUDA is not available on this machine (try --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(name)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_config(preset: str, n_stages: int, **overrides) -> ModelConfig:
    """Return ``PRESETS[preset]`` with ``overrides`` applied and ``n_layers = max(n_layers, n_stages)``.

    Raises ``ValueError`` for an unknown preset, an unknown override field or ``n_stages < 1``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if not isinstance(n_stages, int) or n_stages < 1:
        raise ValueError(f"n_stages must be an int >= 1, got {n_stages!r}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid fields: {sorted(fields)}")
    cfg = dataclasses.replace(PRESETS[preset], **overrides)
    if cfg.n_layers < n_stages:
        cfg = dataclasses.replace(cfg, n_layers=n_stages)
    return cfg


def split_layers(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Split ``n_layers`` blocks into ``n_stages`` contiguous ``[start, end)`` spans, as even as possible.

    Earlier stages take the extra blocks: ``split_layers(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]``.
    Raises ``ValueError`` unless ``1 <= n_stages <= n_layers``.
    """
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    if n_stages > n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {n_stages} stages (each stage needs >= 1 block)")
    base, extra = divmod(n_layers, n_stages)
    spans, start = [], 0
    for i in range(n_stages):
        end = start + base + (1 if i < extra else 0)
        spans.append((start, end))
        start = end
    return spans


# ---------------------------------------------------------------------------------------------------------------------
# Deterministic initialisation helpers


def derive_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from ``(seed, name)`` (stable across processes and platforms)."""
    digest = hashlib.sha256(f"{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def _normal_(param: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """Fill ``param`` with N(0, std^2) drawn on CPU from ``gen`` (so the result is device-independent)."""
    param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).mul_(std))


def _check_seq_len(t: int, seq_len: int) -> None:
    if t > seq_len:
        raise ValueError(f"sequence length {t} exceeds the model's seq_len {seq_len}")


# ---------------------------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension with a learned gain (init 1). Shape-preserving."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def _rope_cache(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape ``[seq_len, head_dim]`` (frequencies repeated for the two halves)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # [T, hd/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, hd]
    return angles.cos().float(), angles.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., T, hd]`` by position: pair ``(i, i + hd/2)`` turns by angle ``pos * base^(-2i/hd)``.

    ``cos``/``sin`` are ``[T, hd]`` tables (rows for positions ``0..T-1``). Norm-preserving, and
    ``<apply_rope(q)[m], apply_rope(k)[n]>`` depends on ``m - n`` only.
    """
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary position embeddings. ``[B, T, D] -> [B, T, D]``, ``T <= seq_len``.

    Positions are ``0..T-1``; the RoPE tables are non-persistent buffers sized for ``cfg.seq_len``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.seq_len = cfg.seq_len
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)  # output projection (scaled init)
        cos, sin = _rope_cache(cfg.seq_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        _check_seq_len(t, self.seq_len)
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each [B, H, T, hd]
        cos = self.rope_cos[:t].to(q.dtype)
        sin = self.rope_sin[:t].to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, hd]
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    """Gated MLP ``down(silu(gate(x)) * up(x))``. ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)  # output projection (scaled init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``h = h + attn(norm(h)); h = h + mlp(norm(h))``. ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h))
        return h + self.mlp(self.mlp_norm(h))

    @torch.no_grad()
    def reset_parameters(self, seed: int, n_layers: int) -> None:
        """Init from ``seed``: linears N(0, 0.02), output projections N(0, 0.02/sqrt(2*n_layers)), norms 1."""
        gen = torch.Generator().manual_seed(seed)
        out_std = INIT_STD / math.sqrt(2 * n_layers)
        for lin, std in (
            (self.attn.qkv, INIT_STD),
            (self.attn.proj, out_std),
            (self.mlp.gate, INIT_STD),
            (self.mlp.up, INIT_STD),
            (self.mlp.down, out_std),
        ):
            _normal_(lin.weight, std, gen)
        self.attn_norm.weight.fill_(1.0)
        self.mlp_norm.weight.fill_(1.0)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline pieces


class Embedding(nn.Module):
    """First stage (trusted trainer): ``tokens LongTensor[B, T] -> FloatTensor[B, T, D]``, ``T <= seq_len``.

    Built deterministically from ``seed`` (weights N(0, 0.02)); the global RNG is untouched. Inputs are moved to
    the module's device. The output is scaled by ``sqrt(d_model)`` when ``cfg.scale_embedding`` (the default).
    """

    def __init__(self, cfg: ModelConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        _normal_(self.tok.weight, INIT_STD, torch.Generator().manual_seed(derive_seed(seed, "embedding")))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape [B, T], got {tuple(tokens.shape)}")
        _check_seq_len(tokens.shape[1], self.cfg.seq_len)
        h = self.tok(tokens.to(self.tok.weight.device, torch.long))
        return h * math.sqrt(self.cfg.d_model) if self.cfg.scale_embedding else h


class Stage(nn.Module):
    """Blocks ``start..end-1`` (global indices) of the decoder: ``h [B, T, D] -> [B, T, D]``, ``T <= seq_len``.

    Block ``j`` is initialised from ``derive_seed(seed, f"block/{j}")``, so its weights do not depend on how the
    network is split. ``h`` is moved to the module's device (dtype unchanged).
    """

    def __init__(self, cfg: ModelConfig, start: int, end: int, *, seed: int = 0) -> None:
        super().__init__()
        if not 0 <= start < end <= cfg.n_layers:
            raise ValueError(f"invalid block span [{start}, {end}) for a model with {cfg.n_layers} layers")
        self.cfg = cfg
        self.start = start
        self.end = end
        with torch.random.fork_rng(devices=[]):
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(start, end))
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        for j, block in zip(range(self.start, self.end), self.blocks):
            block.reset_parameters(derive_seed(seed, f"block/{j}"), self.cfg.n_layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 3 or h.shape[-1] != self.cfg.d_model:
            raise ValueError(f"hidden states must have shape [B, T, {self.cfg.d_model}], got {tuple(h.shape)}")
        _check_seq_len(h.shape[1], self.cfg.seq_len)
        h = h.to(_device_of(self))
        for block in self.blocks:
            h = block(h)
        return h

    def extra_repr(self) -> str:
        return f"start={self.start}, end={self.end}"


class Head(nn.Module):
    """Last stage (trusted trainer): final RMSNorm + untied LM projection.

    ``logits(h [B, T, D]) -> [B, T, V]``; ``forward(h, targets LongTensor[B, T]) -> scalar`` mean cross-entropy
    (computed in float32).
    """

    def __init__(self, cfg: ModelConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        with torch.random.fork_rng(devices=[]):
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        self.norm.weight.fill_(1.0)
        _normal_(self.lm_head.weight, INIT_STD, torch.Generator().manual_seed(derive_seed(seed, "head")))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 3 or h.shape[-1] != self.cfg.d_model:
            raise ValueError(f"hidden states must have shape [B, T, {self.cfg.d_model}], got {tuple(h.shape)}")
        return self.lm_head(self.norm(h.to(self.lm_head.weight.device)))

    def forward(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.logits(h)
        if targets.shape != logits.shape[:2]:
            raise ValueError(f"targets shape {tuple(targets.shape)} != hidden states [B, T] {tuple(logits.shape[:2])}")
        targets = targets.to(logits.device, torch.long)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ---------------------------------------------------------------------------------------------------------------------
# Assembly


def build_pipeline(cfg: ModelConfig, n_stages: int, seed: int) -> tuple[Embedding, list[Stage], Head]:
    """Build ``(embedding, stages, head)`` on CPU; stage ``i`` holds the blocks of
    ``split_layers(cfg.n_layers, n_stages)[i]``.

    Deterministic: the same ``(cfg, seed)`` gives bit-identical weights for any ``n_stages``. Init follows
    GPT-2/Llama: N(0, 0.02), block output projections scaled by ``1/sqrt(2 * n_layers)``, norm gains 1.
    The global torch RNG state is left untouched.
    """
    spans = split_layers(cfg.n_layers, n_stages)
    embedding = Embedding(cfg, seed=seed)
    stages = [Stage(cfg, start, end, seed=seed) for start, end in spans]
    head = Head(cfg, seed=seed)
    return embedding, stages, head


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters in ``module`` (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())
