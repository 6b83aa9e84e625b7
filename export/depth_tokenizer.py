"""The depth tokenizer: a small VQ-VAE that turns a depth image into MolmoAct's 10x10 grid of codes from a 128-entry codebook.

Normalization (the same in training, in the PyTorch encoder and in the exported ONNX stage,
because all three run `normalize` below):

1. depth in metres, any (H, W); 0 means "no data" (what the cameras report) and stays 0;
2. clipped to [0, max_depth_m] (a sensor's range ends; farther is "far", not an outlier);
3. divided by max_depth_m, so 0..1;
4. resized bilinearly (half-pixel centres, no antialiasing) to input_px x input_px. The aspect
   ratio is not kept: every camera maps onto the same square, as MolmoAct's tokenizer does.

The encoder is `n_down` stride-2 convolutions (input_px = grid * 2**n_down) and a 1x1
projection to code_dim; each of the grid*grid latents takes its nearest codebook vector
(squared L2, ties to the lowest index), codes in row-major order (code k = row * grid + col).
The codebook is learned by exponential moving averages of the latents assigned to each code
(no gradient), initialized from a random sample of real latents, with codes unused for a
while restarted on random latents: a dead codebook would waste the 128 tokens.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from edgeact.runtime.errors import ConfigError

WEIGHTS_FILE = "depth_tokenizer.safetensors"
# The depth codes a reference ARM was trained on, as its training log and bundles record them (ModelInfo.depth_codes):
# POOLED_CODES (train-reference's stand-in without --depth-tokenizer) or this prefix + the VQ-VAE weights' sha256.
POOLED_CODES = "pooled"
VQVAE_CODES_PREFIX = "vqvae:"
CONFIG_FILE = "depth_tokenizer.json"
FORMAT = "edgeact-depth-vqvae"


@dataclass(frozen=True)
class DepthTokenizerConfig:
    input_px: int = 80              # side of the square the depth image is resized to
    grid: int = 10                  # codes per side: MolmoAct's 10x10 = 100 depth tokens
    codebook_size: int = 128        # MolmoAct's <DEPTH_0> .. <DEPTH_127>
    code_dim: int = 32              # width of a latent / codebook vector
    channels: tuple[int, ...] = (16, 32, 32)   # conv widths of the encoder (one per stride-2 layer)
    max_depth_m: float = 2.0        # farther is clipped: the simulated table scene lies within 0.25..1.8 m
    commitment: float = 0.25        # weight of the encoder's pull toward its code (VQ-VAE's beta)
    ema_decay: float = 0.9          # codebook EMA: short training runs need a fast one

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.grid < 1 or self.input_px % self.grid:
            raise ConfigError(f"input_px {self.input_px} must be a multiple of grid {self.grid} (e.g. 80 for 10)")
        ratio = self.input_px // self.grid
        if ratio < 2 or ratio & (ratio - 1):
            raise ConfigError(f"input_px / grid = {ratio} must be a power of two >= 2 (stride-2 convolutions); "
                              "use input_px 80 or 160 with grid 10")
        if len(self.channels) != self.n_down or min(self.channels, default=0) < 1:
            raise ConfigError(f"channels {list(self.channels)}: give {self.n_down} positive widths, one per "
                              f"stride-2 layer (input_px {self.input_px} -> grid {self.grid})")
        if not 2 <= self.codebook_size <= 65536 or self.code_dim < 1:
            raise ConfigError(f"codebook_size {self.codebook_size} / code_dim {self.code_dim}: need 2..65536 codes "
                              "and a positive width (MolmoAct: 128 codes)")
        if not (math.isfinite(self.max_depth_m) and 0 < self.max_depth_m <= 100):
            raise ConfigError(f"max_depth_m {self.max_depth_m} must be in (0, 100] metres")
        if not 0 < self.ema_decay < 1 or self.commitment < 0:
            raise ConfigError(f"ema_decay {self.ema_decay} must be in (0, 1) and commitment {self.commitment} >= 0")

    @property
    def n_down(self) -> int:
        return int(math.log2(self.input_px // self.grid))

    @property
    def n_codes(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, data: dict) -> "DepthTokenizerConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"depth tokenizer config: unknown fields {unknown}; it takes {sorted(known)}")
        return cls(**data)


class DepthVQVAE(nn.Module):
    """Encoder, codebook and decoder; `codes(depth_m)` is what the exported stage computes."""

    def __init__(self, config: DepthTokenizerConfig = DepthTokenizerConfig()):
        super().__init__()
        self.config = c = config
        layers: list[nn.Module] = []
        width = 1
        for out in c.channels:
            layers += [nn.Conv2d(width, out, 4, stride=2, padding=1), nn.ReLU()]
            width = out
        layers.append(nn.Conv2d(width, c.code_dim, 1))
        self.encoder = nn.Sequential(*layers)
        layers = [nn.Conv2d(c.code_dim, width, 3, padding=1), nn.ReLU()]
        for i, out in enumerate(reversed((1, *c.channels[:-1]))):
            layers.append(nn.ConvTranspose2d(width, out, 4, stride=2, padding=1))
            if i < c.n_down - 1:
                layers.append(nn.ReLU())
            width = out
        self.decoder = nn.Sequential(*layers)
        # The codebook learns by EMA, not by gradient: buffers, saved with the weights.
        self.register_buffer("codebook", torch.zeros(c.codebook_size, c.code_dim))
        self.register_buffer("ema_count", torch.zeros(c.codebook_size))
        self.register_buffer("ema_sum", torch.zeros(c.codebook_size, c.code_dim))

    # ------------------------------------------------------------------------ the encoder side
    def normalize(self, depth_m: torch.Tensor) -> torch.Tensor:
        """(B, H, W) metres -> (B, 1, S, S) in [0, 1]; see the module docstring."""
        c = self.config
        x = torch.clamp(depth_m.to(torch.float32), 0.0, c.max_depth_m) / c.max_depth_m
        return F.interpolate(x[:, None], size=(c.input_px, c.input_px), mode="bilinear", align_corners=False)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) normalized depth -> (B, grid*grid, code_dim), row-major over the grid."""
        return self.encoder(x).flatten(2).transpose(1, 2)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook vector of each latent (..., code_dim) -> (...) int64."""
        # |z|^2 is the same for every code: argmin of |e|^2 - 2 z.e is the nearest code.
        scores = (self.codebook * self.codebook).sum(-1) - 2.0 * z @ self.codebook.t()
        return torch.argmin(scores, dim=-1)

    def codes(self, depth_m: torch.Tensor) -> torch.Tensor:
        """(B, H, W) or (H, W) metres -> (B, 100) or (100,) int64 codes in [0, codebook_size)."""
        single = depth_m.dim() == 2
        codes = self.nearest(self.latents(self.normalize(depth_m[None] if single else depth_m)))
        return codes[0] if single else codes

    # ------------------------------------------------------------------------ the decoder side
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, grid*grid) codes -> (B, 1, S, S) normalized depth."""
        g = self.config.grid
        z = self.codebook[codes].transpose(1, 2).reshape(codes.shape[0], -1, g, g)
        return self.decoder(z)

    def decode_m(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, grid*grid) codes -> (B, S, S) depth in metres (clipped to the normalized range)."""
        return self.decode(codes)[:, 0].clamp(0.0, 1.0) * self.config.max_depth_m

    # ------------------------------------------------------------------------ training
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalized depth (B, 1, S, S) -> (reconstruction, latents, codes): the straight-through pass."""
        z = self.latents(x)
        codes = self.nearest(z.detach())
        z_q = self.codebook[codes]
        # Straight-through: the decoder sees the code, the encoder gets the decoder's gradient as if it had not.
        z_st = z + (z_q - z).detach()
        g = self.config.grid
        recon = self.decoder(z_st.transpose(1, 2).reshape(x.shape[0], -1, g, g))
        return recon, z, codes

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total loss, reconstruction MSE, latents (N, D) detached, codes (N,)) of one batch; the last two feed
        the codebook's EMA step."""
        recon, z, codes = self(x)
        mse = F.mse_loss(recon, x)
        commit = F.mse_loss(z, self.codebook[codes].detach())
        return mse + self.config.commitment * commit, mse, z.detach().reshape(-1, z.shape[-1]), codes.reshape(-1)

    @torch.no_grad()
    def init_codebook(self, z: torch.Tensor, generator: torch.Generator) -> None:
        """Start the codebook on a random sample of real latents (N, D): no code starts where no data is."""
        pick = _sample_rows(z, self.config.codebook_size, generator)
        self.codebook.copy_(pick)
        self.ema_sum.copy_(pick)
        self.ema_count.fill_(1.0)

    @torch.no_grad()
    def update_codebook(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        """One EMA step over a batch's latents (N, D) and their codes (N,)."""
        decay, k = self.config.ema_decay, self.config.codebook_size
        onehot = F.one_hot(codes, k).to(z.dtype)
        self.ema_count.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(onehot.t() @ z, alpha=1 - decay)
        # Laplace smoothing keeps a rarely used code's division finite.
        n = self.ema_count.sum()
        count = (self.ema_count + 1e-5) / (n + k * 1e-5) * n
        self.codebook.copy_(self.ema_sum / count[:, None])

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, generator: torch.Generator, min_count: float) -> int:
        """Move codes whose EMA usage fell below `min_count` onto random latents of this batch; how many moved."""
        dead = torch.nonzero(self.ema_count < min_count).flatten()
        if len(dead):
            pick = _sample_rows(z, len(dead), generator)
            self.codebook[dead] = pick
            self.ema_sum[dead] = pick
            self.ema_count[dead] = 1.0
        return int(len(dead))


def _sample_rows(z: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    replace = z.shape[0] < n
    index = (torch.randint(0, z.shape[0], (n,), generator=generator) if replace
             else torch.randperm(z.shape[0], generator=generator)[:n])
    return z[index].clone()


# ---------------------------------------------------------------------------- save / load
def save_depth_tokenizer(model: DepthVQVAE, out_dir: str | Path, report: dict | None = None) -> Path:
    """Weights as safetensors and the config (plus the training report) as JSON, in `out_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE))
    meta = {"format": FORMAT, "version": 1, "config": model.config.to_dict(), "training": report or {}}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_tokenizer_meta(tokenizer_dir: str | Path) -> dict:
    from edgeact.runtime.json_files import read_json_object

    path = Path(tokenizer_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: not found; train a depth tokenizer first "
                          "(edgeact train-depth-tokenizer --out DIR)")
    meta = read_json_object(path, ConfigError, "the object edgeact train-depth-tokenizer writes (format, version, "
                            "config)", "copy the tokenizer directory again, or re-run edgeact train-depth-tokenizer")
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}; point at a directory written "
                          "by edgeact train-depth-tokenizer")
    return meta


def depth_codes_identity(tokenizer_dir: str | Path) -> str:
    """What a model trained on this tokenizer's codes records (ModelInfo.depth_codes): "vqvae:" + its weights' sha256."""
    from edgeact.runtime.bundle import sha256_file

    weights = Path(tokenizer_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"{weights}: not found; train a depth tokenizer first (edgeact train-depth-tokenizer --out DIR)")
    return f"{VQVAE_CODES_PREFIX}{sha256_file(weights)}"


def load_depth_tokenizer(tokenizer_dir: str | Path) -> DepthVQVAE:
    """The model saved by `save_depth_tokenizer`, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_tokenizer_meta(tokenizer_dir)
    if not isinstance(meta.get("config"), dict):
        raise ConfigError(f"{Path(tokenizer_dir) / CONFIG_FILE}: 'config' is {meta.get('config')!r}, not the "
                          "tokenizer's settings (input_px, grid, codebook_size ...); re-run edgeact train-depth-tokenizer")
    model = DepthVQVAE(DepthTokenizerConfig.from_dict(meta["config"]))
    weights = Path(tokenizer_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"{weights}: not found beside {CONFIG_FILE}; re-run edgeact train-depth-tokenizer")
    try:
        model.load_state_dict(load_file(str(weights)))
    except SafetensorError as exc:
        raise ConfigError(f"{weights}: truncated or corrupt safetensors file ({exc}); copy the tokenizer directory "
                          "again or re-run edgeact train-depth-tokenizer") from None
    except RuntimeError as exc:
        raise ConfigError(f"{weights}: does not match its config ({str(exc).splitlines()[0]}); re-train") from None
    return model.eval()


@dataclass
class CodebookStats:
    """How much of the codebook a set of codes uses."""
    used: int
    size: int
    perplexity: float          # exp(entropy) of the code histogram: the effective number of codes
    histogram: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, codes: torch.Tensor, size: int) -> "CodebookStats":
        hist = torch.bincount(codes.flatten(), minlength=size).double()
        p = hist / hist.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        return cls(used=int((hist > 0).sum()), size=size, perplexity=math.exp(entropy),
                   histogram=[int(h) for h in hist])
