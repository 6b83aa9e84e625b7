"""The bundle-backed policy: camera frame + instruction -> preprocess -> vision (ViT per crop, connector) -> decode program -> Plan (no torch).

Usable on its own (`BundlePolicy(path).infer(rgb, instruction)`) or from the loop as policy
type "bundle". Two ways to skip decoding work, both token-identical to what the model would
do under the same constraints:

- forced depth: the 100 depth codes come from the caller instead of 100 decoder steps:
  fixed codes, a depth tokenizer (a callable depth_m -> codes), or "sensor": the bundle's own
  `depth_tokenizer` stage (runtime/depth_tokenizer.py; `edgeact add-depth-tokenizer` adds one);
- steering: a user-edited trace (`steer(trace)`) is forced; only the actions are decoded.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, Union

import numpy as np

from edgeact.runtime import stage_io as io
from edgeact.runtime.action_bins import ActionStats
from edgeact.runtime.bundle import UNVERIFIED_FIX_CONFIG, UNVERIFIED_FIX_DEFAULT, Bundle, load_bundle
from edgeact.runtime.decode_program import (ACTION_DECODINGS, DEFAULT_DRAFT_TOKENS, DecodeProgram, DecodeResult,
                                           check_draft_tokens)
from edgeact.runtime.depth_tokenizer import STAGE as DEPTH_TOKENIZER_STAGE  # noqa: F401  (the policy's name for it)
from edgeact.runtime.depth_tokenizer import StageDepthTokenizer, open_depth_tokenizer
from edgeact.runtime.engines import Backend, open_backend
from edgeact.runtime.errors import CheckpointError, ConfigError, EdgeactError, GrammarError
from edgeact.runtime.grammar import AnswerGrammar
from edgeact.runtime.answer import N_DEPTH_TOKENS
from edgeact.runtime.grammar_walk import forced_depth_codes, trace_points
from edgeact.runtime.policy import Observation, Plan, PolicyConfig, PolicyContext, register_policy
from edgeact.runtime.preprocess import ImagePreprocessor
from edgeact.runtime.preprocess_config import PreprocessConfig
from edgeact.runtime.prompt import build_prompt_ids
from edgeact.runtime.token_layout import TokenLayout, load_tokenizer
from edgeact.runtime.vision_stages import VisionStages

# Prompt positions per decoder run while prefilling. A chunk's activations are the policy's peak memory: 128 instead
# of 512 took the int8 bench bundle's peak from 608 to 556 MiB (budget 561), at the same policy-step time on the CPU.
DEFAULT_PREFILL_CHUNK = 128
# On a GPU backend activations live in the device's memory and each run costs kernel launches: the prompt in one
# run and the ViT over every crop at once. H100, onnxruntime CUDA EP, bench checkpoint (edgeact bench-policy
# --device cuda): vision + prefill 84 ms -> 30 ms per policy step against 128 positions and one crop per run.
DEVICE_PREFILL_CHUNK = 1024
# depth_m (H, W) metres aligned to the RGB frame -> 100 depth codes in [0, 128)
DepthTokenizer = Callable[[np.ndarray], Sequence[int]]
ForcedDepth = Union[None, str, Sequence[int], np.ndarray, DepthTokenizer]
# How a robot config's user runs a bundle whose verification failed (`edgeact run` has no flag for it).
ROBOT_CONFIG_UNVERIFIED_FIX = (f"to run it anyway: {UNVERIFIED_FIX_CONFIG} (with `edgeact demo`, which has no config "
                               "file: write one with `edgeact demo ... --write-config robot.json`, set it there, and "
                               "run `edgeact run robot.json`)")

log = logging.getLogger(__name__)


class BundlePolicy:
    """A bundle's stages and decode program behind the loop's Policy interface; one decoding thread."""

    def __init__(self, bundle_dir: str | Path, backend: str = "onnxruntime", *, n_actions: int | None = None,
                 unnorm_key: str | None = None, forced_depth: ForcedDepth = None, threads: int | None = None,
                 prefill_chunk: int | None = None, crops_per_run: int | None = None, allow_unverified: bool = False,
                 verify_checksums: bool = True, backend_options: dict[str, Any] | None = None,
                 action_decoding: str = "greedy", unverified_fix: str = UNVERIFIED_FIX_DEFAULT,
                 require_norm_stats: bool = False, draft_tokens: int = 0):
        # load_bundle refuses a bundle whose verification failed unless allow_unverified; `unverified_fix`
        # is how the caller's user allows it (the robot config's field, a CLI flag). require_norm_stats: refuse a
        # bundle without action statistics (the robot's policy: its actions would not be in robot units); else warn.
        # draft_tokens: each decoder call also tries up to this many drafted tokens: the previous answer's, and from
        # a chunk's second action on the action before it (decode_program.py); made for a stream of frames of one
        # scene (a robot's loop).
        check_draft_tokens(draft_tokens)
        self.bundle = bundle = load_bundle(bundle_dir, verify_checksums=verify_checksums,
                                           allow_failed_verification=allow_unverified, unverified_fix=unverified_fix)
        _warn_if_never_verified(bundle)
        tokenizer_path = bundle.path(bundle.manifest.tokenizer.file)
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.layout = TokenLayout.from_tokenizer(self.tokenizer, str(tokenizer_path))
        n_actions = n_actions if n_actions is not None else int(bundle.manifest.grammar.get("n_actions", 1))
        self.grammar = AnswerGrammar(self.tokenizer, self.layout, n_actions=n_actions)
        self.preprocessor = ImagePreprocessor(
            bundle.config, PreprocessConfig.load(bundle.path(bundle.manifest.tokenizer.preprocessor_file),
                                                  bundle.config))
        self.stats = _action_stats(bundle, unnorm_key, require_norm_stats)
        options = dict(backend_options or {})
        if threads is not None:
            options["threads"] = threads
        self.backend = open_backend(backend, **options)
        # Unset: sized for host memory on a CPU backend; one run each on a GPU backend (DEVICE_PREFILL_CHUNK).
        on_device = self.backend.on_device
        if prefill_chunk is None:
            prefill_chunk = DEVICE_PREFILL_CHUNK if on_device else DEFAULT_PREFILL_CHUNK
        if crops_per_run is None and not on_device:
            crops_per_run = 1
        self.vision = VisionStages(self.backend.stage(bundle, io.VISION_STAGE),
                                   self.backend.stage(bundle, io.CONNECTOR_STAGE), crops_per_run)
        self.decoder = self.backend.decoder(bundle, prefill_chunk)
        self.program = DecodeProgram(self.decoder, bundle.weight(io.EMBEDDING_WEIGHT), bundle.weight(io.LM_HEAD_WEIGHT),
                                     self.grammar, bundle.config.image_patch_id, self.stats, action_decoding,
                                     draft_tokens)
        self._fixed_depth, self._depth_tokenizer = _depth_source(forced_depth, bundle, self.backend)
        self._trace: np.ndarray | None = None
        self._instruction: str | None = None      # the last step's: another one drafts from no earlier answer
        self.depth_fallbacks = 0     # steps whose observation had no depth image: depth was decoded instead

    # -------------------------------------------------------------------------------- steering
    def steer(self, trace: Sequence[Sequence[int]] | None) -> None:
        """Force this trace ([x, y] in [0, 256), 1..5 points) in every following step; None to let the model plan.

        A malformed trace is refused here (GrammarError), not at the next step, and the previous one stays."""
        self._trace = None if trace is None else trace_points(trace, self.grammar.max_trace_points, "steer()")

    @property
    def steering_trace(self) -> np.ndarray | None:
        return self._trace

    def forget_draft(self) -> None:
        """The next step drafts from no earlier answer (a new episode, scene or instruction)."""
        self.program.forget_draft()

    # ------------------------------------------------------------------------------- inference
    def infer(self, rgb: np.ndarray, instruction: str, *, depth_m: np.ndarray | None = None,
              depth_codes: Sequence[int] | None = None, trace: Sequence[Sequence[int]] | None = None,
              depth_units_known: bool = False) -> DecodeResult:
        """One answer for one RGB frame (H, W, 3) uint8. Forced depth: `depth_codes`, else the policy's
        forced_depth (fixed codes, or its depth tokenizer on `depth_m`, (H, W) metres aligned to the frame).
        Forced trace: `trace`, else steer()'s. depth_units_known: the depth comes from a camera driver that applied
        the sensor's scale (Observation.depth_from_camera), so a far scene is not taken for millimetres."""
        start = time.perf_counter()
        if depth_m is not None and np.shape(depth_m) != np.shape(rgb)[:2]:
            raise EdgeactError(f"depth_m of shape {np.shape(depth_m)} is not aligned to the frame {np.shape(rgb)[:2]}; "
                               "give the depth image aligned to the colour frame (the camera's aligned depth stream)")
        if instruction != self._instruction:
            self.program.forget_draft()
            self._instruction = instruction
        inputs = self.preprocessor(rgb)
        prompt = build_prompt_ids(self.tokenizer, self.layout, instruction, inputs)
        # Before the depth tokenizer and the ViT: a prompt the longest answer would not fit after is refused first.
        self.program.check_fits(len(prompt), self._trace if trace is None else trace)
        seconds = {"preprocess": time.perf_counter() - start}
        if depth_codes is None:
            depth_codes = self._forced_depth(depth_m, seconds, depth_units_known)
        else:
            depth_codes = forced_depth_codes(depth_codes)       # a wrong shape or range refused before the ViT
        start = time.perf_counter()
        features = self.vision.run(inputs.images, inputs.image_masks, inputs.pooled_patches_idx)
        seconds["vision"] = time.perf_counter() - start       # ViT over every crop + connector
        height, width = rgb.shape[:2]
        return self.program.run(prompt, features, inputs.pooled_patches_idx, depth_codes=depth_codes,
                                trace=self._trace if trace is None else trace, image_size_px=(width, height),
                                stage_seconds=seconds)

    def _forced_depth(self, depth_m: np.ndarray | None, seconds: dict[str, float],
                      units_known: bool = False) -> Sequence[int] | None:
        if self._fixed_depth is not None:
            return self._fixed_depth
        if self._depth_tokenizer is None:
            return None
        if depth_m is None:
            self.depth_fallbacks += 1
            return None
        start = time.perf_counter()
        codes = self._depth_tokenizer(depth_m, units_known=True) if units_known and \
            isinstance(self._depth_tokenizer, StageDepthTokenizer) else self._depth_tokenizer(depth_m)
        seconds["depth_tokenizer"] = time.perf_counter() - start
        return codes

    def step(self, obs: Observation) -> Plan:
        result = self.infer(obs.rgb, obs.instruction, depth_m=obs.depth_m, depth_units_known=obs.depth_from_camera)
        return Plan(actions=result.actions, actions_normalized=result.actions_normalized, trace_px=result.trace_px,
                    depth_codes=result.depth_codes, observation_time_s=obs.timestamp_s,
                    created_time_s=time.monotonic(), stage_seconds=dict(result.stage_seconds),
                    decode_steps=result.decode_steps, choices=result.choices,
                    trace_forced=result.trace_forced, trace_kept=result.trace_forced and self._trace is not None)

    def close(self) -> None:
        """Release device memory (TensorRT); host buffers and sessions go with the object."""
        self.backend.close()


def _warn_if_never_verified(bundle: Bundle) -> None:
    """A bundle never compared with its reference (`--no-verify`) loads, but not silently."""
    if bundle.manifest.verification.status != "not_run":
        return
    checkpoint = bundle.manifest.model.source_checkpoint or "CKPT"
    log.warning("%s: never verified (verification 'not_run', e.g. exported or quantized with --no-verify): its "
                "outputs have not been compared with the reference model; verify it with `edgeact verify %s "
                "--checkpoint %s` (the checkpoint it was exported from)", bundle.root, bundle.root, checkpoint)


def _action_stats(bundle: Bundle, unnorm_key: str | None, required: bool = False) -> ActionStats | None:
    norm_stats = bundle.manifest.norm_stats
    if not norm_stats and unnorm_key is None:
        # Without statistics the actions stay normalized: [-1, 1] where the robot expects metres and radians.
        problem = (f"{bundle.root}: the bundle has no norm_stats, so its actions are normalized bin centres in "
                   "[-1, 1], not robot units (a full-scale bin would command 1 m or 1 rad); re-export it from a "
                   "checkpoint whose config.json has norm_stats (the training data's action q01/q99)")
        if required:
            raise ConfigError(problem)
        log.warning("%s; Plan.actions are normalized", problem)
        return None
    try:
        return ActionStats.from_norm_stats(norm_stats, unnorm_key)
    except CheckpointError as exc:      # here the statistics come from the bundle, and the key from the caller
        raise ConfigError(f"{bundle.root}: {exc}") from None


def _depth_source(forced_depth: ForcedDepth, bundle: Bundle,
                  backend: Backend) -> tuple[np.ndarray | None, DepthTokenizer | None]:
    """(fixed codes, tokenizer) from the forced_depth option; "sensor" runs the bundle's stage on `backend`."""
    if forced_depth is None:
        return None, None
    if isinstance(forced_depth, str):
        if forced_depth != "sensor":
            raise ConfigError(f"forced_depth {forced_depth!r} unknown; use 'sensor', 100 codes, a depth tokenizer "
                              "callable, or None to let the model decode depth")
        return None, open_depth_tokenizer(bundle, backend)
    if callable(forced_depth):
        return None, forced_depth
    try:
        return forced_depth_codes(forced_depth), None
    except GrammarError as exc:
        raise ConfigError(f"forced_depth: {exc}; give 'sensor', {N_DEPTH_TOKENS} codes, a depth tokenizer callable, "
                          "or None") from None


@register_policy("bundle")
@dataclass
class BundlePolicyConfig(PolicyConfig):
    """A policy that runs an exported bundle on this machine."""

    # In its own process by default: the decode program's Python between engine calls would
    # otherwise contend for the GIL with the 100 Hz control thread (`process: false` opts out).
    process_default: ClassVar[bool] = True

    path: str = ""                         # bundle directory (relative: to the robot config's directory;
                                           # a store's: ~/edgeact/bundles/current, edgeact flash)
    backend: str = "onnxruntime"           # onnxruntime or tensorrt
    provider: str | None = None            # onnxruntime only: cpu, cuda, tensorrt
    target: str | None = None              # tensorrt only: which engines (default: those for this GPU)
    n_actions: int | None = None           # actions per answer (default: the bundle's)
    unnorm_key: str | None = None          # which norm_stats (required when the bundle has several)
    forced_depth: str | None = None        # None, or "sensor": depth codes from the bundle's depth tokenizer
    threads: int | None = None
    prefill_chunk: int | None = None       # prompt positions per decoder run; unset: 128 on a CPU, 1024 on a GPU
    crops_per_run: int | None = None       # ViT crops per run; unset: 1 on a CPU (host memory), on a GPU as many as
                                           # the ViT engine takes (all on the CUDA EP; TensorRT's profile: 1)
    allow_unverified: bool = False
    verify_checksums: bool = True          # hash every file at start (seconds per GB); sizes are always checked
    action_decoding: str = "greedy"        # greedy (MolmoAct's), or median of each action bin's distribution
    cuda_tf32: bool = False                # onnxruntime's cuda / tensorrt providers: fp32 matrix products in TF32
                                           # (faster vision and prefill; tokens may differ from fp32's)
    # Each decoder call also tries up to this many drafted tokens (the previous answer's; from a chunk's second
    # action on, the action before it): consecutive frames of a scene have similar answers and a chunk's actions
    # resemble each other, so many choices need no call of their own; the tokens are the same as without (0: off).
    draft_tokens: int = DEFAULT_DRAFT_TOKENS

    @property
    def cpu_threads_apply(self) -> bool:
        return self.backend != "tensorrt"       # its engines run on the GPU: threads is refused there

    def __post_init__(self) -> None:
        from edgeact.runtime.engines import backend_names

        if self.backend not in backend_names():
            raise ConfigError(f"backend: {self.backend!r} unknown; use one of {', '.join(backend_names())}")
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise ConfigError(f"threads: {self.threads!r}; use a positive number of CPU threads, or leave it out "
                              "(every core)")
        if self.backend == "tensorrt":
            if self.target is not None:
                from edgeact.runtime.trt_targets import get_target

                try:
                    get_target(self.target)
                except ConfigError as exc:
                    raise ConfigError(f"target: {exc}") from None
            given = [name for name in ("provider", "threads") if getattr(self, name) is not None]
            if given:
                raise ConfigError(f"{', '.join(given)}: onnxruntime's setting{'s' if len(given) > 1 else ''}, and "
                                  "backend is 'tensorrt' (its engines run on the GPU); drop "
                                  f"{'them' if len(given) > 1 else 'it'}, or set backend: onnxruntime")
        else:
            if self.target is not None:
                raise ConfigError("target: which TensorRT engines backend 'tensorrt' runs; backend is "
                                  f"{self.backend!r}: drop target, or set backend: tensorrt")
            if self.backend == "onnxruntime" and self.provider is not None:
                from edgeact.runtime.ort_engine import PROVIDERS

                if self.provider not in PROVIDERS:
                    raise ConfigError(f"provider: {self.provider!r} unknown; use one of {', '.join(PROVIDERS)}")
        if self.cuda_tf32 and self.provider not in ("cuda", "tensorrt"):
            raise ConfigError(f"cuda_tf32: applies to onnxruntime's cuda and tensorrt providers; provider is "
                              f"{self.provider!r}: set provider: cuda, or drop cuda_tf32")
        if not self.path:
            raise ConfigError("path: the bundle directory is required, e.g. path: bundles/molmoact-int8")
        if self.forced_depth not in (None, "sensor"):
            raise ConfigError(f"forced_depth: {self.forced_depth!r} unknown; use 'sensor' or leave it unset")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk: {self.prefill_chunk} must be >= 1 (e.g. 512)")
        if self.crops_per_run is not None and self.crops_per_run < 1:
            raise ConfigError(f"crops_per_run: {self.crops_per_run} must be >= 1 (1 on a CPU; on a GPU, the most crops)")
        if self.action_decoding not in ACTION_DECODINGS:
            raise ConfigError(f"action_decoding: {self.action_decoding!r} unknown; use one of "
                              f"{', '.join(ACTION_DECODINGS)}")
        if self.n_actions is not None and self.n_actions < 1:
            raise ConfigError(f"n_actions: {self.n_actions} must be >= 1 (1, or the checkpoint's chunk size 8)")
        check_draft_tokens(self.draft_tokens)

    def bundle_dir(self, config_dir: str | Path | None) -> Path:
        """`path` with `~` expanded; a relative one is beside the robot config (`config_dir`), as every path in it."""
        path = Path(self.path).expanduser()
        if not path.is_absolute() and config_dir is not None:
            path = Path(config_dir) / path
        return path

    def make_policy(self, context: PolicyContext) -> BundlePolicy:
        path = self.bundle_dir(context.config_dir)
        options: dict[str, Any] = {}
        if self.provider is not None:
            options["provider"] = self.provider
        if self.target is not None:
            options["target"] = self.target
        if self.cuda_tf32:
            options["cuda_tf32"] = True
        return BundlePolicy(path, self.backend, n_actions=self.n_actions, unnorm_key=self.unnorm_key,
                            forced_depth=self.forced_depth, threads=self.threads, prefill_chunk=self.prefill_chunk,
                            crops_per_run=self.crops_per_run, action_decoding=self.action_decoding,
                            allow_unverified=self.allow_unverified, verify_checksums=self.verify_checksums,
                            backend_options=options, unverified_fix=ROBOT_CONFIG_UNVERIFIED_FIX,
                            require_norm_stats=True, draft_tokens=self.draft_tokens)
