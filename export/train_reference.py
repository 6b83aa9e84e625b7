"""Train the reference ARM on the CPU (or a GPU: TrainOptions.device): a small MolmoAct-architecture model learns the
full answer from expert demos.

    report = train_reference("out/demos", "out/reference", TrainOptions(steps=2400))

The model is `synthetic_config(variant, size)` with the tokenizer rebuilt to include the task's
instructions; it is trained from PyTorch's default initialization (seeded) with AdamW, linear
warm-up and cosine decay, on right-padded batches (the decoder is causal, so padding after a
sequence changes nothing before it) with the loss on the answer tokens only. The result is a
MolmoAct checkpoint (config.json with the demos' norm_stats, safetensors, tokenizer.json,
preprocessor_config.json) plus `training_log.json` (loss per step, held-out accuracy).
Same demos, options and seed -> the same weights (on the same machine and thread count; on a CPU).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from edgeact.export.train_reference_data import (IGNORE, KINDS, POINT_TEMPLATE, DepthCodesFn, ReferenceEncoder,
                                                 TrainingSequence, grounding_labels, pointing_targets,
                                                 pooled_depth_codes, split_by_episode, task_instructions,
                                                 token_centres)
from edgeact.runtime.action_bins import ACTION_DIMS
from edgeact.runtime.arm_config import ArmConfig
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.preprocess import concat_image_inputs
from edgeact.runtime.preprocess_config import PreprocessConfig

LOG_FILE = "training_log.json"
NORM_KEY = "edgeact_sim_reference"      # drivers.sim.demos.NORM_KEY (not imported: that pulls in mujoco)
TRACE_END_FRAMES = 16                   # held-out first frames answered greedily to see where the trace ends
CONNECTOR_INITS = ("variance", "torch")
CPU_ONLY_OPTIONS = ("grounding_weight", "target_probe_weight")     # TrainOptions that refuse another device
POINT_ANSWER_BOUND = 14                 # ids in a greedy pointing answer: ` [[x, y]]` and end-of-text, with room


@dataclass(frozen=True)
class TrainOptions:
    steps: int = 2400
    batch_size: int = 8
    lr: float = 1.5e-3
    min_lr_fraction: float = 0.1        # cosine decay ends at lr * this
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    variant: str = "D"
    size: str = "reference"
    max_crops: int = 1                  # one high-resolution crop besides the global view: CPU-sized prompts
    held_out_fraction: float = 0.1      # of episodes, for teacher-forced accuracy
    eval_samples: int = 64              # held-out samples scored at the end (0: none)
    # Loss weight per answer-token kind (KINDS order: depth, trace, action, text). The fixed text is forced at
    # run time and the depth codes can come from the sensor, so the trace and the actions, which move the
    # robot, get most of the gradient.
    loss_weights: tuple[float, float, float, float] = (0.3, 1.0, 1.0, 0.1)
    # The first action of the chunk counts this many times an action token: the later ones nearly repeat it,
    # so given the true prefix they are easy to copy, while the first must be read from the image and trace.
    first_action_weight: float = 4.0
    # Matrix products in bfloat16 (torch.autocast) where the CPU has native bf16 (AVX512-BF16 / AMX): 1.6x
    # faster steps measured on this project's CI class of machine; the weights and the optimizer stay fp32.
    bf16: bool = True
    # torch.compile (inductor) of the model for the training steps, after a one-time compilation of about 80 s:
    # 2.0x faster steps (0.32 s vs 0.65 s at batch 8) when the decoder's training attention was still eager; with
    # the fused kernel (decoder.py), which alone took a step from 2.09 s to 1.05 s on a 2-core AVX2 machine, compiled
    # steps there took 0.98 s: about 7 %, about 1.5 min net over the recipe's 2400 steps once compiled.
    compile: bool = False
    # Pointing samples per step besides the batch (0: none): "point to the {colour} block" -> ` [[x, y]]` on the
    # same frames, Molmo's grounding pre-task. Short sequences whose whole loss is finding the named block, which
    # the full answer, 200+ tokens of which only a few depend on the colour word, teaches too weakly.
    pointing_batch: int = 0
    pointing_weight: float = 1.0        # their loss's weight against the batch's
    # A dense grounding loss on the image tokens, from two linear heads that are trained here and not saved: which
    # block (none, red, green, blue) each token shows, and where the token is in its view. It gives the small ViT the
    # block colours and positions that the answers then read. Taken on the pointing samples' images when there are
    # any, else on the answer batch's own (0: off).
    grounding_weight: float = 0.0
    # The first this many steps train on the pointing samples alone (a grounding curriculum): the full answer's trace
    # can settle on a colour-blind average before pointing is learned, so finding the named block comes first (0: off).
    pointing_first_steps: int = 0
    # Trace-only samples per step besides the batch (0: none): "trajectory to {instruction}" -> the sample's trace
    # alone, as in MolmoAct's training mix; the full answer's trace learns the gripper but not the goal (README).
    trace_batch: int = 0
    # Soft targets for the action tokens: a Gaussian of this many bins around the true bin (0: the one bin).
    action_sigma: float = 0.0
    # The three options below were tried against the committed ARM's finding that it ignores the image (README,
    # "The reference ARM ignores the image"); none raised closed-loop success, so all default to the recipe's.
    # "variance": the connector's linear layers (attention pooling, SwiGLU projector) drawn with std 1 / sqrt(fan_in),
    # which keeps the size of what passes through, instead of PyTorch's default (1 / sqrt(3 fan_in), "torch"), which
    # shrinks it ~1.7x per layer: with it the projector's gate multiplies two small numbers, and the image features
    # start at ~1/10 of the token embeddings.
    connector_init: str = "torch"
    # This times the mean square of the batch's image features is added to the loss. The decoder reads them through
    # RMSNorm, so the answer's loss barely depends on their scale and its gradient is orthogonal to them: every Adam
    # step makes them longer. Unchecked they grew to 70-250 000x the token embeddings' RMS; 0.01 holds them near
    # 2x (0: off).
    feature_decay: float = 0.0
    # Each depth code the model is fed in the answer (the labels stay true) is replaced by a random code with this
    # probability. The codes show where the arm is (not the blocks: README); fed clean, they are the easiest way to
    # the trace's start, and a model that answers from them alone ignores the image (0: off).
    depth_input_noise: float = 0.0
    # The same for the trace's digits the model is fed in the answer: noisy earlier points ask each point to be found
    # from the gripper and the goal, not continued from the points before it. Tried at 0.5 with the grounding loss and
    # the probe: the trace still ended no nearer than a constant point (README, "The block is in the hidden state"),
    # so 0 (off).
    trace_input_noise: float = 0.0
    # A probe loss in the answer: at every position that predicts a trace or action token, a linear head (trained here,
    # not saved) reads from the decoder's last hidden state where the named block is in the image (16 x 16 bins of
    # trace units; cross-entropy). The depth codes do not show the blocks (3 cm cubes on a 10 x 10 grid), so the
    # answer can only find them in the image; this asks the answer's own positions to fetch them. Tried at 1: the
    # answer still ignored the image and its trace got worse (README, "Where the blocks are"), so 0 (off).
    target_probe_weight: float = 0.0
    # Where the steps run: "cpu" (the recipe) or a CUDA device ("cuda", "cuda:1") on a machine with a GPU (README,
    # "Training on a GPU"). The batches are encoded on the CPU and moved there; matrix products in bfloat16 where the
    # device has it; weights and optimizer fp32. A GPU run is not bit-identical to a CPU run of the same options.
    device: str = "cpu"
    # Processes that encode the answer batches ahead of the steps (0: the training process between steps, as the
    # recipe). A GPU step of the reference size took 42 ms at batch 64 on an H200 (another run beside it), while one
    # process encodes a sample in a few ms: without them the GPU waits on the encoding. Same batches, same order.
    loader_workers: int = 0
    # Warm start: a checkpoint of this architecture and tokenizer, trained with the same first demos set (its action
    # statistics) and depth codes (its training_log.json), whose weights replace the seeded initialization, e.g.
    # DAgger's next round goes on from the policy that visited its states (None: PyTorch's seeded default init).
    init: str | None = None
    # Each answer sample is shown, with this probability, with its blocks' colours exchanged (a random one of the five
    # other assignments): the frame's blocks repainted with their own shading and the instruction's colour word
    # exchanged alike (drivers/sim/recolour.py), the answer unchanged. Every recorded layout then comes in every colour
    # assignment, so the named block can only be told by its colour in the image (0: off).
    colour_swap: float = 0.0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"TrainOptions.device: 'cpu', 'cuda' or 'cuda:N'; got {self.device!r}")
        if self.loader_workers < 0:
            raise ConfigError(f"TrainOptions.loader_workers: encoding processes, >= 0; got {self.loader_workers}")
        cpu_only = [name for name in CPU_ONLY_OPTIONS if getattr(self, name)]
        if self.device != "cpu" and cpu_only:
            raise ConfigError(f"TrainOptions: {', '.join(cpu_only)} train on the CPU only (their heads' targets are "
                              f"built there); drop them or train with device 'cpu', not {self.device!r}")
        if self.steps < 1 or self.batch_size < 1 or self.warmup_steps < 0 or self.eval_samples < 0:
            raise ConfigError(f"TrainOptions: steps and batch_size >= 1, warmup_steps and eval_samples >= 0; got "
                              f"{self.steps}, {self.batch_size}, {self.warmup_steps}, {self.eval_samples}")
        if self.pointing_first_steps and not (self.pointing_batch and 0 < self.pointing_first_steps < self.steps):
            raise ConfigError(f"TrainOptions.pointing_first_steps: the steps on pointing samples alone need "
                              f"pointing_batch > 0 and must leave steps for the full answer (0 < N < steps = "
                              f"{self.steps}); got {self.pointing_first_steps} with pointing_batch {self.pointing_batch}")
        if self.connector_init not in CONNECTOR_INITS:
            raise ConfigError(f"TrainOptions.connector_init: one of {', '.join(CONNECTOR_INITS)}; got "
                              f"{self.connector_init!r}")
        if self.connector_init == "variance" and self.init is not None:
            raise ConfigError(f"TrainOptions: connector_init 'variance' redraws a fresh model's connector, and init "
                              f"{self.init!r} then replaces every weight with the checkpoint's, so the redraw would do "
                              "nothing; drop --connector-init variance (the checkpoint's connector is kept) or --init")
        for name in ("depth_input_noise", "trace_input_noise", "colour_swap"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"TrainOptions.{name}: a probability in [0, 1]; got {getattr(self, name)}")
        if not self.feature_decay >= 0:
            raise ConfigError(f"TrainOptions.feature_decay: a weight >= 0; got {self.feature_decay}")
        if not self.target_probe_weight >= 0:
            raise ConfigError(f"TrainOptions.target_probe_weight: a weight >= 0; got {self.target_probe_weight}")
        if not self.action_sigma >= 0:
            raise ConfigError(f"TrainOptions.action_sigma: a width in action bins, >= 0; got {self.action_sigma}")
        if self.trace_batch < 0:
            raise ConfigError(f"TrainOptions.trace_batch: trace-only samples per step, >= 0; got {self.trace_batch}")
        if self.pointing_batch < 0 or not self.pointing_weight >= 0 or not self.grounding_weight >= 0:
            raise ConfigError(f"TrainOptions: pointing_batch, pointing_weight and grounding_weight >= 0; got "
                              f"{self.pointing_batch}, {self.pointing_weight}, {self.grounding_weight}")
        if not self.first_action_weight >= 0:
            raise ConfigError(f"TrainOptions.first_action_weight: must be >= 0, got {self.first_action_weight}")
        if len(self.loss_weights) != len(KINDS) or any(not (w >= 0) for w in self.loss_weights) or \
                not any(self.loss_weights):
            raise ConfigError(f"TrainOptions.loss_weights: {len(KINDS)} weights >= 0 ({', '.join(KINDS)}), not all 0; "
                              f"got {self.loss_weights}")
        if not (math.isfinite(self.lr) and self.lr > 0 and 0 <= self.min_lr_fraction <= 1
                and math.isfinite(self.weight_decay) and self.weight_decay >= 0
                and math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ConfigError(f"TrainOptions: finite lr > 0, min_lr_fraction in [0, 1], finite weight_decay >= 0, "
                              f"finite grad_clip > 0; "
                              f"got {self.lr}, {self.min_lr_fraction}, {self.weight_decay}, {self.grad_clip}")


@dataclass
class TrainReport:
    out_dir: Path | None
    n_parameters: int
    train_samples: int
    held_out_samples: int
    losses: list[float] = field(default_factory=list)      # one per optimizer step
    seconds_per_step: float = 0.0
    held_out_accuracy: dict[str, float] = field(default_factory=dict)   # teacher-forced, per KINDS + "all"
    action_bin_error: float = float("nan")                 # mean |predicted - true| action bin, held out
    # trace_end_error on held-out first frames: {"model": ..., "constant": ..., "frames": n} (trace units)
    trace_end: dict[str, float] = field(default_factory=dict)
    # image_reliance on held-out samples: {"own": ..., "other": ..., "samples": n} (mean cross-entropy, nats)
    image_use: dict[str, float] = field(default_factory=dict)
    # Samples of the later --demos sets left out of training because their scene (seed) is a held-out episode's.
    held_out_scene_samples_dropped: int = 0
    # Whether the steps' matrix products ran in bfloat16 (TrainOptions.bf16 asks; the device must have it), and
    # torch's CPU threads meanwhile: what the run's speed and its bit-exactness depend on.
    bf16_autocast: bool | None = None
    torch_threads: int = 0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "out_dir": str(self.out_dir) if self.out_dir else None}


@dataclass
class Trainer:
    """The model, its encoder and the split, ready to step; `train_reference` drives it."""
    model: torch.nn.Module
    encoder: ReferenceEncoder
    arrays: dict[str, np.ndarray]
    train_idx: np.ndarray
    held_idx: np.ndarray
    options: TrainOptions
    cfg: ArmConfig
    preprocess_config: PreprocessConfig
    held_out_scene_samples_dropped: int = 0     # later sets' samples of held-out scenes, not trained on


def distinct_demos_dirs(dirs: list[str | Path]) -> None:
    """Refuse (ConfigError) a demos set given twice: its samples would train twice, and its held-out scenes too."""
    resolved = [Path(d).resolve() for d in dirs]
    twice = [d for d, r in zip(dirs, resolved) if resolved.count(r) > 1]
    if twice:
        raise ConfigError(f"--demos {twice[0]} is given {resolved.count(Path(twice[0]).resolve())} times (as "
                          f"{', '.join(map(str, twice))}); give each demonstration set once")


def prepare(demos_dir: str | Path | list[str | Path], options: TrainOptions,
            depth_codes_fn: DepthCodesFn = pooled_depth_codes) -> Trainer:
    """Load the demos (one set, or several trained on together: the first's action statistics are the model's),
    build the tokenizer, config and seeded model.

    The held-out episodes are drawn from the first set alone, so the held-out measures stay those of the first
    set's demonstrations, whichever sets are added, and adding a set changes no held-out episode. The later sets'
    samples (an episode's first chunks, a policy's states) train, except those of a held-out episode's scene (the
    same scene seed: sets recorded from overlapping seeds show the same scenes), which are left out
    (Trainer.held_out_scene_samples_dropped)."""
    from edgeact.drivers.sim.demos import joined_sets, load_demos
    from edgeact.export.model import MolmoActModel
    from edgeact.export.synthetic import synthetic_config
    from edgeact.export.tokenizer_build import build_tokenizer

    dirs = [demos_dir] if isinstance(demos_dir, (str, Path)) else list(demos_dir)
    distinct_demos_dirs(dirs)
    sets = [load_demos(d) for d in dirs]       # load_demos checks the manifest (norm_stats[NORM_KEY] among it)
    demos = sets[0]
    arrays, scene_seeds = joined_sets(sets)
    tokenizer = build_tokenizer(extra_texts=task_instructions(pointing=options.pointing_batch > 0,
                                                              trace=options.trace_batch > 0))
    cfg = dataclasses.replace(synthetic_config(options.variant, options.size, tokenizer),
                              norm_stats={NORM_KEY: demos.norm_stats[NORM_KEY]})
    preprocess_config = PreprocessConfig.for_model(cfg, max_crops=options.max_crops)
    encoder = ReferenceEncoder(tokenizer, cfg, preprocess_config, cfg.norm_stats, NORM_KEY, depth_codes_fn)
    n_first = sum(shard["samples"] for shard in demos.manifest["shards"])
    train_idx, held_idx = split_by_episode(arrays["episode"][:n_first], options.held_out_fraction, options.seed)
    later = np.arange(n_first, len(arrays["episode"]))
    held_scene = np.isin(scene_seeds[later], scene_seeds[held_idx])
    train_idx = np.concatenate([train_idx, later[~held_scene]])
    if not len(train_idx):
        raise ConfigError(f"{', '.join(map(str, dirs))}: no training samples left after holding out episodes; "
                          "record more episodes")
    torch.manual_seed(options.seed)
    model = MolmoActModel(cfg)
    if options.connector_init == "variance":
        init_connector(model)
    if options.init is not None:
        warm_start(model, cfg, tokenizer, options.init, depth_codes_identity(depth_codes_fn))
    return Trainer(model, encoder, arrays, train_idx, held_idx, options, cfg, preprocess_config,
                   int(held_scene.sum()))


def depth_codes_identity(depth_codes_fn: DepthCodesFn) -> str:
    """Which depth codes a depth_codes_fn gives, as training_log.json records it ("pooled", "vqvae:<sha256>"; "" for
    a function that does not say)."""
    return getattr(depth_codes_fn, "identity", "")


def _depth_codes_named(identity: str) -> str:
    if identity == pooled_depth_codes.identity:
        return "the pooled-depth stand-in's codes (no --depth-tokenizer)"
    if identity.startswith("vqvae:"):
        return f"a depth VQ-VAE's codes (--depth-tokenizer whose weights' sha256 is {identity[6:18]}...)"
    return f"depth codes {identity!r}" if identity else "depth codes of unrecorded identity"


def check_init_depth_codes(init: str | Path, identity: str, warn: bool = True) -> None:
    """Refuse (ConfigError) a warm start from a checkpoint trained on other depth codes than this run's (`identity`,
    see depth_codes_identity): its answers' depth tokens would mean other depths. Where the checkpoint has no
    training log saying which (or its log does not record it), warn (warn=True) that this cannot be checked."""
    log_path = Path(init) / LOG_FILE
    try:
        log = json.loads(log_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log = None
    recorded = log.get("depth_codes") if isinstance(log, dict) else None
    if not isinstance(recorded, str) or not recorded or not identity:
        if warn:
            why = (f"it has no readable {LOG_FILE}" if not isinstance(log, dict) else
                   f"its {LOG_FILE} does not record depth_codes" if not isinstance(recorded, str) or not recorded else
                   "this run's depth_codes_fn has no identity")
            warnings.warn(f"--init {init}: whether it was trained on this run's depth codes "
                          f"({_depth_codes_named(identity)}) cannot be checked: {why}; warm-start only from a "
                          "checkpoint trained on the same depth codes", stacklevel=2)
        return
    if recorded != identity:
        raise ConfigError(f"--init {init}: trained on {_depth_codes_named(recorded)} ({LOG_FILE} depth_codes "
                          f"{recorded!r}), but this run trains on {_depth_codes_named(identity)} ({identity!r}); give "
                          "the --depth-tokenizer it was trained with (none for the pooled stand-in), or train without "
                          "--init")


def warm_start(model, cfg: ArmConfig, tokenizer, init: str | Path, depth_codes: str | None = None) -> None:
    """Load the checkpoint `init` into the freshly built model: it must be this architecture, with this tokenizer,
    these action statistics (those of the first demos set) and, where `depth_codes` (this run's
    depth_codes_identity) is given, these depth codes, or its action or depth tokens would mean other actions or
    depths."""
    from edgeact.export.checkpoint import load_checkpoint
    from edgeact.runtime.token_layout import load_tokenizer

    ckpt = load_checkpoint(init)
    if depth_codes is not None:
        check_init_depth_codes(init, depth_codes)
    if ckpt.norm_stats.get(NORM_KEY) != cfg.norm_stats[NORM_KEY]:
        raise ConfigError(f"--init {init}: its action statistics (norm_stats[{NORM_KEY!r}]) are not the first "
                          "--demos set's; give first the demos set that checkpoint was trained on")
    if load_tokenizer(ckpt.tokenizer_path).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"--init {init}: its tokenizer is not the one these options build (trained with other "
                          "--pointing-batch / --trace-batch instructions?); warm-start with the options it was "
                          "trained with")
    own = model.state_dict()
    differ = sorted(k for k in own.keys() | ckpt.tensors.keys()
                    if k not in own or k not in ckpt.tensors or own[k].shape != ckpt.tensors[k].shape)
    if differ:
        raise ConfigError(f"--init {init}: its weights do not fit this architecture ({len(differ)} tensors differ, "
                          f"e.g. {differ[0]}); give the --size and --variant it was trained with")
    model.load_state_dict(ckpt.tensors, strict=True)


def training_device(options: TrainOptions) -> torch.device:
    """options.device, checked to exist here."""
    device = torch.device(options.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {options.device}: this torch sees no CUDA device "
                              "(torch.cuda.is_available() is False); train on the CPU (no --device) or on a machine "
                              "with an NVIDIA GPU and a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {options.device}: only {torch.cuda.device_count()} CUDA device(s) here "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def init_connector(model) -> None:
    """Redraw the connector's linear weights (attention pooling, projector) from N(0, 1 / fan_in): each layer then
    keeps the scale of its input, and the projected image features start larger than the token embeddings."""
    backbone = model.vision
    with torch.no_grad():
        for part in (backbone.image_pooling_2d, backbone.image_projector):
            for layer in part.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.normal_(0.0, layer.in_features ** -0.5)


def collate(sequences: list[TrainingSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; images of all samples joined (pooled indices shifted onto them)."""
    length = max(len(s.ids) for s in sequences)
    ids = np.full((len(sequences), length), pad_id, dtype=np.int64)
    labels = np.full((len(sequences), length), IGNORE, dtype=np.int64)
    kinds = np.full((len(sequences), length), -1, dtype=np.int64)
    for b, s in enumerate(sequences):
        ids[b, :len(s.ids)], labels[b, :len(s.ids)], kinds[b, :len(s.ids)] = s.ids, s.labels, s.kinds
    images = concat_image_inputs([s.image_inputs for s in sequences])
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels), "kinds": torch.from_numpy(kinds),
            "images": torch.from_numpy(images.images), "image_masks": torch.from_numpy(images.image_masks),
            "pooled_patches_idx": torch.from_numpy(images.pooled_patches_idx)}


def batch_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # Padding is never an <im_patch>, so the i-th image feature still lands on the i-th <im_patch>.
    return model(batch["input_ids"], batch["images"], batch["image_masks"], batch["pooled_patches_idx"])


def weighted_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], weights: torch.Tensor,
                  first_action_weight: float = 1.0, action_ids: torch.Tensor | None = None,
                  action_sigma: float = 0.0) -> torch.Tensor:
    """Cross-entropy on the answer tokens, each weighted by its kind (weights[kind]; weights[-1] = 0 for no loss),
    the first action's ACTION_DIMS tokens of each sequence once more by first_action_weight.

    With action_sigma > 0 (and action_ids, the 256 action token ids in bin order) an action token's target is a
    Gaussian over the neighbouring bins (sigma in bins) instead of its one bin: the bins are ordered, so a guess
    one bin off is nearly right, and an uncertain prediction peaks in the middle of its mass rather than at
    whichever single bin collects most (with hard targets, the end bins that hold the clipped tails)."""
    kinds = batch["kinds"]
    is_action = kinds == KINDS.index("action")
    lead = is_action & (is_action.cumsum(dim=1) <= ACTION_DIMS)
    token_w = weights[kinds] * (batch["labels"] != IGNORE) * torch.where(lead, first_action_weight, 1.0)
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)
    token_ce = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE, reduction="none")
    if action_sigma > 0 and action_ids is not None:
        rows = torch.nonzero(is_action.reshape(-1) & (flat_labels != IGNORE)).squeeze(1)
        if len(rows):
            log_p = F.log_softmax(flat_logits[rows], dim=-1)[:, action_ids]           # (n, 256) in bin order
            true_bin = torch.searchsorted(action_ids, flat_labels[rows]).unsqueeze(1).float()
            offsets = torch.arange(len(action_ids), dtype=torch.float32, device=log_p.device).unsqueeze(0)
            target = torch.softmax(-0.5 * ((offsets - true_bin) / action_sigma) ** 2, dim=-1)
            token_ce = token_ce.index_copy(0, rows, -(target * log_p).sum(dim=-1))
    token_w = token_w.reshape(-1)
    return (token_ce * token_w).sum() / token_w.sum().clamp_min(1e-12)


def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 matrix products natively (oneDNN's check)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def bf16_autocast(options: TrainOptions, device: torch.device) -> bool:
    """Whether the steps run their matrix products in bfloat16: asked for (options.bf16) and native on the device."""
    return options.bf16 and (bf16_supported() if device.type == "cpu" else torch.cuda.is_bf16_supported())


def lr_at(step: int, options: TrainOptions) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_fraction at the last step."""
    if step < options.warmup_steps:
        return options.lr * (step + 1) / options.warmup_steps
    span = max(options.steps - options.warmup_steps, 1)
    progress = min((step - options.warmup_steps) / span, 1.0)
    floor = options.min_lr_fraction
    return options.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class Grounding:
    """The grounding loss (TrainOptions.grounding_weight): linear heads on the image tokens, dropped after training."""

    NONE_WEIGHT = 0.1       # most tokens show no block

    def __init__(self, trainer: Trainer):
        from edgeact.drivers.sim.task import COLOURS

        height, width = trainer.arrays["rgb"].shape[1:3]
        self.size = (width, height)
        self.centres, self.grids = token_centres(trainer.encoder.preprocessor, height, width)
        per_view = max(rows * cols for rows, cols in self.grids)
        offsets = np.concatenate([[0], np.cumsum([rows * cols for rows, cols in self.grids])[:-1]])
        within = np.arange(len(self.centres)) - np.repeat(offsets, [rows * cols for rows, cols in self.grids])
        self.places = np.where(np.isnan(self.centres[:, 0]), IGNORE, within)
        hidden = trainer.cfg.llm_config.hidden_size
        self.heads = torch.nn.ModuleDict({"block": torch.nn.Linear(hidden, 1 + len(COLOURS)),
                                          "place": torch.nn.Linear(hidden, per_view)})
        self.class_weights = torch.tensor([self.NONE_WEIGHT] + [1.0] * len(COLOURS))

    def loss(self, model, batch: dict[str, torch.Tensor], blocks: list[np.ndarray]) -> torch.Tensor:
        """blocks: each image's block places (demos' `blocks` rows, COLOURS order) as the batch shows them."""
        # The image tokens again, outside the (possibly compiled) forward that consumed them: the ViT runs twice on
        # these images, a small part of a step (it is 4 layers of width 64 against the decoder's sequences).
        features = model.image_features(batch["images"], batch["image_masks"], batch["pooled_patches_idx"]).float()
        labels = torch.from_numpy(np.concatenate([grounding_labels(row, self.centres, self.grids, *self.size)
                                                  for row in blocks]))
        places = torch.from_numpy(np.tile(self.places, len(blocks)))
        return (F.cross_entropy(self.heads["block"](features), labels, weight=self.class_weights, ignore_index=IGNORE)
                + F.cross_entropy(self.heads["place"](features), places, ignore_index=IGNORE))


class TargetProbe:
    """The target probe (TrainOptions.target_probe_weight): a linear head on the answer's trace and action positions
    that reads where the named block is in the image, dropped after training."""

    BINS = 16                   # per axis, over the trace's 256 units

    def __init__(self, trainer: Trainer):
        from edgeact.drivers.sim.task import COLOURS

        self.head = torch.nn.Linear(trainer.cfg.llm_config.hidden_size, 2 * self.BINS)
        arrays = trainer.arrays
        named = [[c for c, name in enumerate(COLOURS) if f" {name} " in f" {text} "] for text in arrays["instruction"]]
        unnamed = [i for i, found in enumerate(named) if len(found) != 1]
        if unnamed:
            raise ConfigError(f"TrainOptions.target_probe_weight: demo sample {unnamed[0]}'s instruction "
                              f"{str(arrays['instruction'][unnamed[0]])!r} names no one block of {', '.join(COLOURS)}; "
                              "train these demos without the target probe")
        colour = np.array([found[0] for found in named])
        target = arrays["blocks"][np.arange(len(colour)), colour]          # (n, 2) trace units, -1 where hidden
        self.bins = np.where(target >= 0, np.clip(target * self.BINS // 256, 0, self.BINS - 1), IGNORE)

    def loss(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor], samples: list[int]) -> torch.Tensor:
        kinds = batch["kinds"]
        at = ((kinds == KINDS.index("trace")) | (kinds == KINDS.index("action"))) & (batch["labels"] != IGNORE)
        rows, _ = torch.nonzero(at, as_tuple=True)
        targets = torch.from_numpy(self.bins[np.asarray(samples)])[rows]     # (n, 2)
        if not bool((targets != IGNORE).any()):     # every named block hidden in this batch: nothing to read
            return hidden.new_zeros((), dtype=torch.float32)
        scores = self.head(hidden[at].float()).reshape(-1, 2, self.BINS)
        return F.cross_entropy(scores.reshape(-1, self.BINS), targets.reshape(-1), ignore_index=IGNORE)


class Draws:
    """Shuffled epochs over a pool of sample indices, without end: `take(n)` gives the next n (seeded order)."""

    def __init__(self, pool: np.ndarray, seed):
        self.pool, self.rng, self.queue = np.asarray(pool), np.random.default_rng(seed), []

    def take(self, n: int) -> list[int]:
        while len(self.queue) < n:
            self.queue += self.rng.permutation(self.pool).tolist()
        picked, self.queue = self.queue[:n], self.queue[n:]
        return picked


def corrupt_answer_inputs(sequence: TrainingSequence, pool: np.ndarray, p: float,
                          rng: np.random.Generator) -> TrainingSequence:
    """The sequence with each token of `pool` (the depth codes, or the digits) among its answer's inputs replaced by
    a random one of `pool` with probability p; the labels (what each position is asked to predict) stay the true
    ones."""
    ids = sequence.ids.copy()
    answer = np.arange(len(ids)) >= sequence.n_prompt
    hit = answer & np.isin(ids, pool) & (rng.random(len(ids)) < p)
    ids[hit] = rng.choice(pool, int(hit.sum()))
    return dataclasses.replace(sequence, ids=ids)


def train_steps(trainer: Trainer, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Run options.steps AdamW steps over shuffled epochs of the training samples; the loss of each step."""
    options, model = trainer.options, trainer.model
    device = training_device(options)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": options.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=options.lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    grounding = Grounding(trainer) if options.grounding_weight else None
    if grounding is not None:
        optimizer.add_param_group({"params": list(grounding.heads.parameters()), "weight_decay": 0.0})
    pad_id = trainer.encoder.layout.bos_id
    # kind -1 (prompt, padding) -> index -1: no loss
    weights = torch.tensor(list(options.loss_weights) + [0.0], device=device)
    use_bf16 = bf16_autocast(options, device)
    forward = torch.compile(model, dynamic=True) if options.compile else model
    probe = TargetProbe(trainer) if options.target_probe_weight else None
    if probe is not None:
        optimizer.add_param_group({"params": list(probe.head.parameters()), "weight_decay": 0.0})
        hidden_fn = torch.compile(model.hidden_states, dynamic=True) if options.compile else model.hidden_states
    pointing = pointing_targets(trainer.arrays, trainer.train_idx) if options.pointing_batch else None
    if pointing is not None and not len(pointing):
        raise ConfigError("TrainOptions.pointing_batch: the demos show no visible block to point to; record them "
                          "again with `edgeact sim-demos` (format 2 records where the blocks are)")
    answers = Draws(trainer.train_idx, options.seed)
    point_draws = Draws(np.arange(len(pointing)), [options.seed, 1]) if pointing is not None else None
    trace_draws = Draws(trainer.train_idx, [options.seed, 2])
    action_ids = torch.as_tensor(np.asarray(trainer.encoder.layout.action_ids, dtype=np.int64), device=device)
    depth_ids = np.asarray(trainer.encoder.layout.depth_code_ids, dtype=np.int64)
    noise_rng = np.random.default_rng([options.seed, 3])
    digit_ids = np.asarray(trainer.encoder.layout.digit_ids, dtype=np.int64)
    trace_noise_rng = np.random.default_rng([options.seed, 4])

    def sequences_loss(sequences: list[TrainingSequence], first_action_weight: float = 1.0,
                       samples: list[int] | None = None):
        batch = {k: v.to(device, non_blocking=True) for k, v in collate(sequences, pad_id).items()}
        hidden = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if probe is not None and samples is not None:
                hidden = hidden_fn(batch["input_ids"], batch["images"], batch["image_masks"],
                                   batch["pooled_patches_idx"])
                logits = model.logits(hidden)
            else:
                logits = batch_logits(forward, batch)
            # The features once more, outside the compiled graph: the ViT's share of a step is small (4 layers of
            # width 64 over the crops, against the decoder over ~550 positions).
            features = model.image_features(batch["images"], batch["image_masks"], batch["pooled_patches_idx"]) \
                if options.feature_decay else None
        loss = weighted_loss(logits.float(), batch, weights, first_action_weight, action_ids, options.action_sigma)
        if features is not None:
            loss = loss + options.feature_decay * features.float().pow(2).mean()
        if hidden is not None:
            loss = loss + options.target_probe_weight * probe.loss(hidden, batch, samples)
        return batch, loss

    # The answer batches, drawn up front in the order the steps take them, encoded ahead by the loader's workers.
    batches = [answers.take(options.batch_size) for _ in range(options.pointing_first_steps, options.steps)]
    swaps = colour_swaps(batches, options.colour_swap, [options.seed, 5])
    loader = iter(torch.utils.data.DataLoader(
        _Encoded(trainer.encoder, trainer.arrays), batch_sampler=swaps, collate_fn=list,
        num_workers=options.loader_workers, prefetch_factor=4 if options.loader_workers else None))
    losses = []
    model.train()
    for step in range(options.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, options)
        loss = torch.zeros((), device=device)
        if step >= options.pointing_first_steps:
            samples, sequences = batches[step - options.pointing_first_steps], next(loader)
            swapped = swaps[step - options.pointing_first_steps]
            if options.depth_input_noise:
                sequences = [corrupt_answer_inputs(s, depth_ids, options.depth_input_noise, noise_rng)
                             for s in sequences]
            if options.trace_input_noise:
                sequences = [corrupt_answer_inputs(s, digit_ids, options.trace_input_noise, trace_noise_rng)
                             for s in sequences]
            batch, loss = sequences_loss(sequences, options.first_action_weight, samples)
            if grounding is not None and point_draws is None:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    aux = grounding.loss(model, batch, [shown_blocks(trainer.arrays, i, swap) for i, swap in swapped])
                loss = loss + options.grounding_weight * aux
        if point_draws is not None:
            pairs = pointing[point_draws.take(options.pointing_batch)]
            points, point_loss = sequences_loss([trainer.encoder.encode_pointing(trainer.arrays, int(i), int(c))
                                                 for i, c in pairs])
            loss = loss + options.pointing_weight * point_loss
            if grounding is not None:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    aux = grounding.loss(model, points, [trainer.arrays["blocks"][int(i)] for i, _ in pairs])
                loss = loss + options.grounding_weight * aux
        if options.trace_batch and step >= options.pointing_first_steps:      # the first steps: pointing alone
            loss = loss + sequences_loss([trainer.encoder.encode_trace(trainer.arrays, i)
                                          for i in trace_draws.take(options.trace_batch)])[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise ConfigError(f"training diverged at step {step} (loss {losses[-1]}); lower --lr")
        if on_step is not None:
            on_step(step, losses[-1])
    model.to("cpu")         # held-out measures, saving and export read it here
    model.eval()
    return losses


def colour_swaps(batches: list[list[int]], p: float, seed) -> list[list[tuple[int, int]]]:
    """The batches as (sample, colour exchange) pairs: with probability p an index into recolour.PERMUTATIONS, else
    -1 (the sample as recorded). Drawn up front from one seeded generator: the same whatever the loader's workers."""
    from edgeact.drivers.sim.recolour import PERMUTATIONS

    rng = np.random.default_rng(seed)
    return [[(int(i), int(rng.integers(len(PERMUTATIONS))) if p and rng.random() < p else -1) for i in batch]
            for batch in batches]


def shown_blocks(arrays: dict[str, np.ndarray], i: int, swap: int) -> np.ndarray:
    """Where each block colour is in sample i's frame as trained: recorded, or after its colour exchange."""
    if swap < 0:
        return arrays["blocks"][i]
    from edgeact.drivers.sim.recolour import PERMUTATIONS, recolour_blocks

    return recolour_blocks(arrays["blocks"][i], PERMUTATIONS[swap])


class _Encoded(torch.utils.data.Dataset):
    """Training sample (i, colour exchange) as a TrainingSequence (what the loader's workers compute)."""

    def __init__(self, encoder: ReferenceEncoder, arrays: dict[str, np.ndarray]):
        self.encoder, self.arrays = encoder, arrays

    def __len__(self) -> int:
        return len(self.arrays["episode"])

    def __getitem__(self, item: tuple[int, int]) -> TrainingSequence:
        i, swap = item
        return self.encoder.encode(self.arrays, int(i), swap)


def pointing_accuracy(trainer: Trainer, pairs: np.ndarray) -> float:
    """Share of greedy pointing answers (pairs of [sample, colour]) whose nearest visible block is the named one.

    Nearest, not exact: an answer a few units off still found the block, while one on another block did not; an
    exact-digit score reads 0 for a model that points at the right block every time."""
    from edgeact.drivers.sim.task import COLOURS
    from edgeact.export.generate import generate_greedy

    encoder, blocks, right = trainer.encoder, trainer.arrays["blocks"], 0
    with torch.inference_mode():
        for i, c in pairs:
            inputs = encoder.image_inputs(trainer.arrays["rgb"][i])
            ids = encoder.prompt(POINT_TEMPLATE.format(colour=COLOURS[c]), inputs)
            result = generate_greedy(trainer.model, torch.from_numpy(ids), torch.from_numpy(inputs.images),
                                     torch.from_numpy(inputs.image_masks), torch.from_numpy(inputs.pooled_patches_idx),
                                     POINT_ANSWER_BOUND, eos_token_id=encoder.layout.bos_id)
            numbers = re.findall(r"\d+", encoder.tokenizer.decode(list(result.token_ids), skip_special_tokens=False))
            if len(numbers) < 2:
                continue                                   # no point given: not found
            point = np.array([int(numbers[0]), int(numbers[1])])
            visible = [k for k in range(len(blocks[i])) if blocks[i, k, 0] >= 0]
            right += min(visible, key=lambda k: np.abs(point - blocks[i, k]).sum()) == c
    return right / len(pairs) if len(pairs) else float("nan")


def trace_end_error(trainer: Trainer, indices: np.ndarray, frames: int = TRACE_END_FRAMES,
                    answer_fn: Callable | None = None) -> tuple[float, float, int]:
    """Where the trace ends, on held-out first frames answered greedily under their own instruction: (the mean
    distance from the answer's last trace point to the true one, the same for the best constant end point (the true
    ends' mean), frames used), in trace units.

    Teacher-forced accuracy cannot show whether the trace goes where the task goes: given the true first points the
    rest of a path is easy to continue. A model whose first figure is not well below the second locates the gripper
    but plans the same path for every scene."""
    arrays = trainer.arrays
    firsts = [int(i) for i in indices if arrays["step"][i] == 0][:frames]
    if not firsts:
        return float("nan"), float("nan"), 0
    if answer_fn is None:
        def answer_fn(rgb, instruction):
            return greedy_answer(trainer.model, trainer.encoder, rgb, instruction)
    truth = np.array([arrays["trace"][i, arrays["trace_len"][i] - 1] for i in firsts], dtype=float)
    with torch.inference_mode():
        ends = np.array([answer_fn(arrays["rgb"][i], str(arrays["instruction"][i])).trace[-1] for i in firsts],
                        dtype=float)
    return (float(np.linalg.norm(ends - truth, axis=1).mean()),
            float(np.linalg.norm(truth - truth.mean(axis=0), axis=1).mean()), len(firsts))


def other_scene_partners(episodes: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """For each sample of `indices`, a sample from another episode (`episodes`: every sample's, in order): the one
    half the samples further on, or the next after it from another episode, wrapping around. Every frame of one
    episode shows the same blocks in the same places, so a frame from the same episode is no test of what the
    image is used for."""
    episodes = np.asarray(episodes)
    n = len(episodes)
    if len(np.unique(episodes)) < 2:
        raise ConfigError(f"image reliance needs frames from 2 episodes or more; these {n} samples are all from one: "
                          "record more episodes")
    partners = []
    for i in np.asarray(indices, dtype=np.int64):
        j = (i + n // 2) % n
        while episodes[j] == episodes[i]:
            j = (j + 1) % n
        partners.append(j)
    return np.asarray(partners, dtype=np.int64)


def image_reliance(trainer: Trainer, indices: np.ndarray, batch_size: int = 4) -> tuple[float, float]:
    """Teacher-forced cross-entropy of the trace and action tokens (mean, nats) with each sample's own frame, and with
    the frame of a sample from another episode (`other_scene_partners`: same prompt, same depth codes, another
    scene's pixels).

    The two are equal for a model that ignores the image: its answer then comes from the instruction and the depth
    codes alone, which show the arm but not the blocks, so it does not know where the named block is."""
    pad_id = trainer.encoder.layout.bos_id
    scored = (KINDS.index("trace"), KINDS.index("action"))
    indices = np.asarray(indices, dtype=np.int64)
    partners = other_scene_partners(trainer.arrays["episode"], indices)
    totals, count = np.zeros(2), 0
    with torch.inference_mode():
        for start in range(0, len(indices), batch_size):
            own = [trainer.encoder.encode(trainer.arrays, int(i)) for i in indices[start:start + batch_size]]
            other = [dataclasses.replace(s, image_inputs=trainer.encoder.image_inputs(trainer.arrays["rgb"][int(j)]))
                     for s, j in zip(own, partners[start:start + batch_size])]
            for j, sequences in enumerate((own, other)):
                batch = collate(sequences, pad_id)
                logits = batch_logits(trainer.model, batch).float()
                mask = torch.isin(batch["kinds"], torch.tensor(scored)) & (batch["labels"] != IGNORE)
                ce = F.cross_entropy(logits[mask], batch["labels"][mask], reduction="sum")
                totals[j] += float(ce)
            count += int(mask.sum())
    return (float(totals[0] / count), float(totals[1] / count)) if count else (float("nan"), float("nan"))


def teacher_forced_accuracy(trainer: Trainer, indices: np.ndarray, batch_size: int = 4) -> tuple[dict[str, float], float]:
    """Share of answer tokens the model predicts right given the true prefix, per kind; and the mean action bin error."""
    hits = np.zeros(len(KINDS) + 1)
    counts = np.zeros(len(KINDS) + 1)
    bin_errors: list[np.ndarray] = []
    first_action = int(trainer.encoder.layout.action_ids[0])
    pad_id = trainer.encoder.layout.bos_id
    with torch.inference_mode():
        for start in range(0, len(indices), batch_size):
            batch = collate([trainer.encoder.encode(trainer.arrays, int(i)) for i in indices[start:start + batch_size]],
                            pad_id)
            predicted = batch_logits(trainer.model, batch).argmax(-1)
            answer = batch["labels"] != IGNORE
            right = (predicted == batch["labels"]) & answer
            for k in range(len(KINDS)):
                of_kind = batch["kinds"] == k
                hits[k] += int((right & of_kind).sum())
                counts[k] += int(of_kind.sum())
            hits[-1] += int(right.sum())
            counts[-1] += int(answer.sum())
            is_action = batch["kinds"] == KINDS.index("action")
            # A prediction outside the action tokens counts as the farthest bin.
            guess = (predicted[is_action] - first_action).clamp(-1, 256).numpy()
            truth = (batch["labels"][is_action] - first_action).numpy()
            bin_errors.append(np.where((guess < 0) | (guess > 255), 255, np.abs(guess - truth)))
    names = list(KINDS) + ["all"]
    accuracy = {name: float(h / c) for name, h, c in zip(names, hits, counts) if c}
    errors = np.concatenate(bin_errors) if bin_errors else np.zeros(0)
    return accuracy, float(errors.mean()) if errors.size else float("nan")


def greedy_answer(model, encoder: ReferenceEncoder, rgb: np.ndarray, instruction: str):
    """The model's answer under grammar-masked greedy decoding (always parses): an Answer."""
    from edgeact.export.generate import generate_greedy
    from edgeact.runtime.grammar_walk import MaskedGreedyConstraint

    image_inputs = encoder.image_inputs(rgb)
    ids = encoder.prompt(instruction, image_inputs)
    # Above the longest answer (~390 ids: fixed text, 100 codes, 5 points of 3-digit coordinates, 8 x 7 actions
    # with separators); the grammar ends generation with end-of-text anyway.
    bound = 400 + 8 * 7 * 4
    result = generate_greedy(model, torch.from_numpy(ids), torch.from_numpy(image_inputs.images),
                             torch.from_numpy(image_inputs.image_masks),
                             torch.from_numpy(image_inputs.pooled_patches_idx), bound,
                             eos_token_id=encoder.layout.bos_id,
                             allowed_token_fn=MaskedGreedyConstraint(encoder.grammar))
    return encoder.grammar.parse_ids(result.token_ids)


def save(trainer: Trainer, out_dir: str | Path, report: TrainReport, overwrite: bool = False,
         extra_files: Callable[[Path, TrainReport], None] | None = None) -> Path:
    """The trained model as a MolmoAct checkpoint, with the training log beside the weights (and what
    `extra_files(folder, report)` writes there, e.g. a loss plot), published at out_dir at once: a cut leaves either
    the previous out_dir or the whole new one, never a checkpoint without its log."""
    import shutil

    from edgeact.export.checkpoint import CheckpointError, save_checkpoint
    from edgeact.runtime.atomic_dir import fsync_tree, occupied, partial_dir, publish

    tensors = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    broken = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if broken:      # a checkpoint of NaN weights would load, export and verify against itself: never written
        raise ConfigError(f"training diverged: {len(broken)} of {len(tensors)} weight tensors hold NaN or inf (e.g. "
                          f"{broken[0]}); nothing was written to {out_dir}: lower --lr, or raise --steps so the "
                          "warm-up is longer")
    out = Path(out_dir)
    if occupied(out) and not overwrite:
        raise CheckpointError(f"{out}: already exists and is not empty; choose another directory or overwrite it "
                              "(CLI: train-reference --overwrite)")
    # The checkpoint is written whole (save_checkpoint) into a hidden sibling of out_dir, the log beside it there,
    # and the finished folder renamed into place (the loaders name a `.NAME.partial-*` left by a cut).
    stage = partial_dir(out)
    try:
        folder = save_checkpoint(stage / out.name, trainer.cfg, tensors, trainer.encoder.tokenizer,
                                 trainer.preprocess_config)
        report.out_dir = out
        # Which depth codes the answers were trained on: `edgeact export` records it in the bundle, and
        # add-depth-tokenizer refuses a stage whose codes the model never learned.
        depth_codes = depth_codes_identity(trainer.encoder.depth_codes_fn)
        (folder / LOG_FILE).write_text(json.dumps({"options": dataclasses.asdict(trainer.options),
                                                   "depth_codes": depth_codes, **report.to_dict()}, indent=1) + "\n")
        if extra_files is not None:
            extra_files(folder, report)
        fsync_tree(folder)
        publish(folder, out)
    except BaseException:
        report.out_dir = None
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)        # empty once published; on a failure, the partial checkpoint
    return out


def train_reference(demos_dir: str | Path | list[str | Path], out_dir: str | Path | None,
                    options: TrainOptions = TrainOptions(), depth_codes_fn: DepthCodesFn = pooled_depth_codes, *,
                    overwrite: bool = False, on_step: Callable[[int, float], None] | None = None,
                    extra_files: Callable[[Path, TrainReport], None] | None = None) -> TrainReport:
    """Prepare, train, score the held-out episodes, and save to out_dir (None: keep nothing on disk; extra_files:
    see `save`)."""
    trainer = prepare(demos_dir, options, depth_codes_fn)
    report = TrainReport(None, sum(p.numel() for p in trainer.model.parameters()), len(trainer.train_idx),
                         len(trainer.held_idx), held_out_scene_samples_dropped=trainer.held_out_scene_samples_dropped)
    report.bf16_autocast = bf16_autocast(options, training_device(options))
    report.torch_threads = torch.get_num_threads()
    start = time.perf_counter()
    report.losses = train_steps(trainer, on_step)
    report.seconds_per_step = (time.perf_counter() - start) / options.steps
    held = trainer.held_idx[:options.eval_samples]
    if len(held):
        report.held_out_accuracy, report.action_bin_error = teacher_forced_accuracy(trainer, held)
        if options.pointing_batch:
            report.held_out_accuracy["point"] = pointing_accuracy(
                trainer, pointing_targets(trainer.arrays, held)[:options.eval_samples])
        model_error, constant_error, frames = trace_end_error(trainer, trainer.held_idx)
        if frames:
            report.trace_end = {"model": model_error, "constant": constant_error, "frames": frames}
        # Spread over the held-out episodes (the first eval_samples come from a few), each against another scene's frame.
        spread = trainer.held_idx[np.unique(np.linspace(0, len(trainer.held_idx) - 1, options.eval_samples).astype(int))]
        own, other = image_reliance(trainer, spread)
        report.image_use = {"own": own, "other": other, "samples": len(spread)}
    if out_dir is not None:
        save(trainer, out_dir, report, overwrite, extra_files)
    return report
