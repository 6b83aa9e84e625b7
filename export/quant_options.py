"""What `edgeact quantize` may be asked: one validated options record per run, recorded verbatim in the manifest."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from edgeact.runtime import stage_io
from edgeact.runtime.errors import ConfigError

PRECISIONS = ("int8", "fp8", "int4")
BACKENDS = ("onnxruntime", "modelopt")
INT4_FORMATS = ("auto", "nbits", "qdq")
INT8_FORMATS = INT4_FORMATS                 # weight-only int8 (w8a16) is written in int4's two forms
# int8: w8a8 is static Q/DQ on weights and activations (calibrated, SmoothQuant optional); w8a16 quantizes the
# weights only; w8a8-dynamic quantizes each token's activations with its own scale at run time (onnxruntime on a
# CPU only; export/quant_dynamic.py). QuantizeOptions._default_int8_mode says which is chosen when none is asked
# for, and why.
INT8_MODES = ("w8a8", "w8a16", "w8a8-dynamic")
W8A16_ACCURACY_LEVEL = 4                    # int8 compute in MatMulNBits: the fast 8-bit kernel
# w8a8-dynamic's MLP down-projections, whose input has outlier channels (export/quant_dynamic.py): per-token int8
# after SmoothQuant (the default), or W8A16 as every w8a8-dynamic bundle had them until SmoothQuant was added there.
DOWN_PROJECTIONS = ("smoothquant", "w8a16")
DYNAMIC_SMOOTHQUANT_ALPHA = 0.5             # alpha for them unless --smoothquant is given
ARRAY_DTYPES = ("float32", "float16")
# Stages each precision quantizes unless told: INT4 is weight-only, which pays where weights dominate
# (the bandwidth-bound decoder); the small compute-bound ViT gains nothing from it. int8 takes the ViT in
# both modes: w8a16 keeps its accuracy there and, on the `bench` checkpoint, its speed (0.9x the fp32 time).
# The connector (pooling + projector) goes with the ViT: together they were the one `vision` stage.
DEFAULT_STAGES = {"int8": stage_io.MODEL_STAGES,
                  "fp8": stage_io.MODEL_STAGES,
                  "int4": (stage_io.DECODER_STAGE,)}
# Op types a QDQ recipe may be asked to quantize. Linear layers are MatMul; quantizing Add/Mul/Softmax
# too puts Q/DQ on the residual stream and the attention probabilities, which wrecks a decoder.
QDQ_OP_TYPES = ("MatMul", "Gemm", "Conv", "Add", "Mul", "Softmax", "Gather", "Concat")
# Options only some recipes read: field -> (its flag, the recipes that read it). The manifest records every option,
# so one given to a recipe that does not read it would claim what was not done: refused (QuantizeOptions._check_read).
RECIPE_OPTIONS = {
    "op_types": ("--op-types", "int8 w8a8"),
    "quantize_attention": ("--quantize-attention", "int8 w8a8"),
    "per_channel": ("--per-tensor", "int8 w8a8, int8 w8a16 qdq and fp8"),
    "block_size": ("--block-size", "int4, int8 w8a16 nbits and w8a8-dynamic's W8A16 down-projections"),
    "accuracy_level": ("--accuracy-level", "the MatMulNBits forms: int4 nbits, int8 w8a16 nbits and w8a8-dynamic's "
                                           "W8A16 down-projections"),
    "int4_format": ("--int4-format", "int4"),
    "decode_steps": ("--decode-steps", "recipes that calibrate the decoder: int8 w8a8, fp8 and w8a8-dynamic's "
                                       "SmoothQuant"),
}


@dataclass(frozen=True)
class QuantizeOptions:
    precision: str
    target: str | None = None               # TensorRT target (runtime/trt_targets.py); None: onnxruntime on a CPU
    stages: tuple[str, ...] | None = None   # default DEFAULT_STAGES[precision]
    op_types: tuple[str, ...] = ("MatMul",)
    exclude_nodes: tuple[str, ...] = ()
    smoothquant_alpha: float | None = None  # int8: SmoothQuant strength in (0, 1); None: off
    per_channel: bool = True                # int8 (w8a8, w8a16 qdq) / fp8 weights: one scale per output channel
    quantize_attention: bool = False        # int8 w8a8: also the activation x activation MatMuls (QK^T, PV)
    block_size: int = 128                   # int4, int8 w8a16 nbits (and w8a8-dynamic's W8A16 layers): weights
                                            # per scale, along the input dim
    accuracy_level: int | None = None       # MatMulNBits compute: 0 fp32 ... 4 int8 (onnxruntime CPU); None: 4 for
                                            # int8 w8a16 and w8a8-dynamic's W8A16 down-projections (the fast 8-bit
                                            # kernel), 0 for int4
    int4_format: str = "auto"               # nbits: MatMulNBits (onnxruntime); qdq: DequantizeLinear int4 (TensorRT)
    arrays_dtype: str = "float32"           # embedding / lm_head arrays: kept fp32 unless asked
    backend: str = "onnxruntime"
    int8_mode: str | None = None            # int8: w8a8 / w8a16 / w8a8-dynamic; None: chosen in __post_init__
                                            # (see _default_int8_mode)
    int8_format: str = "auto"               # int8 w8a16: nbits (MatMulNBits bits=8) or qdq (int8 DequantizeLinear)
    decode_steps: int = 2                   # decoder calibration: single-token steps per sample besides the chunk
    down_projections: str | None = None     # int8 w8a8-dynamic: one of DOWN_PROJECTIONS; None: smoothquant
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} unknown; use one of {', '.join(PRECISIONS)}")
        if self.target is not None:
            from edgeact.runtime.trt_targets import check_precision

            check_precision(self.target, self.precision)   # e.g. fp8 on Orin: names int8 / int4 instead
        object.__setattr__(self, "stages", tuple(self.stages or DEFAULT_STAGES[self.precision]))
        object.__setattr__(self, "op_types", tuple(self.op_types))
        object.__setattr__(self, "exclude_nodes", tuple(self.exclude_nodes))
        unknown = [s for s in self.stages if s not in stage_io.MODEL_STAGES]
        if unknown or not self.stages:
            raise ConfigError(f"stages {list(self.stages)}: quantize some of {', '.join(stage_io.MODEL_STAGES)}")
        bad_ops = [o for o in self.op_types if o not in QDQ_OP_TYPES]
        if bad_ops or not self.op_types:
            raise ConfigError(f"op types {bad_ops or '(none)'} not quantizable here; use some of {', '.join(QDQ_OP_TYPES)} "
                              "(MatMul alone is the safe default for decoders)")
        if self.smoothquant_alpha is not None:
            if self.precision != "int8":
                raise ConfigError("SmoothQuant is an int8 option (it balances INT8 activation and weight ranges); "
                                  "drop --smoothquant for fp8 / int4")
            if not 0.0 < self.smoothquant_alpha < 1.0:
                raise ConfigError(f"SmoothQuant alpha {self.smoothquant_alpha} must be in (0, 1); 0.5 is usual, "
                                  "0.75-0.85 for models with strong activation outliers")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block size {self.block_size} must be a power of two >= 16 (32, 64 or 128)")
        if self.accuracy_level is not None and self.accuracy_level not in range(5):
            raise ConfigError(f"accuracy level {self.accuracy_level} must be 0-4 (onnxruntime MatMulNBits)")
        for name, value, choices in (("int4 format", self.int4_format, INT4_FORMATS),
                                     ("arrays dtype", self.arrays_dtype, ARRAY_DTYPES), ("backend", self.backend, BACKENDS)):
            if value not in choices:
                raise ConfigError(f"{name} {value!r} unknown; use one of {', '.join(choices)}")
        if self.decode_steps < 0:
            raise ConfigError(f"decode_steps is {self.decode_steps}; use 0 or more")
        self._check_int8_mode()
        self._check_read()
        # The weight format the recipe writes (int4's, or int8's): MatMulNBits is an onnxruntime contrib op.
        flag, fmt = {"int4": ("--int4-format", self.int4_format),
                     "int8": ("--int8-format", self.int8_format)}.get(self.precision, ("", ""))
        if self.for_tensorrt and fmt == "nbits":
            raise ConfigError(f"{flag} nbits with --target {self.target}: TensorRT cannot parse MatMulNBits; drop "
                              f"{flag} (a target gets qdq) or give {flag} qdq")
        writes_nbits = self.int8_mode == "w8a16" or self._dynamic_keeps_w8a16()
        if writes_nbits and self.accuracy_level is None and self.resolved_int8_format() == "nbits":
            # onnxruntime 1.32 runs 8-bit MatMulNBits at level 0 through a slow path (export/quant_w8a16.py).
            object.__setattr__(self, "accuracy_level", W8A16_ACCURACY_LEVEL)

    def _check_read(self) -> None:
        """Refuse an option of RECIPE_OPTIONS given (other than its default) to a recipe that does not read it."""
        if self.backend != "onnxruntime":
            return
        recipe, reads = self._recipe_reads()
        defaults = {f.name: f.default for f in fields(self)}
        unread = [name for name in RECIPE_OPTIONS if name not in reads and getattr(self, name) != defaults[name]]
        if not unread:
            return
        given, why = [], []
        for name in unread:
            flag, read_by = RECIPE_OPTIONS[name]
            value = getattr(self, name)
            given.append(flag if isinstance(value, bool) else
                         f"{flag} {','.join(value) if isinstance(value, tuple) else value}")
            if name == "decode_steps" and self.needs_calibration:     # the recipe calibrates, but not the decoder
                why.append(f"{flag} (it calibrates the decoder, which --stages leaves out)")
            else:
                why.append(f"{flag} (read by {read_by})")
        raise ConfigError(f"{_listed(given, 'and')}: {recipe}; it does not read {_listed(why, 'or')}, which the "
                          f"manifest would record as applied: drop {'it' if len(given) == 1 else 'them'}")

    def _recipe_reads(self) -> tuple[str, set[str]]:
        """(what the recipe these options choose does, the fields of RECIPE_OPTIONS it reads); the recipes are
        export/quant_int8.py, quant_w8a16.py, quant_dynamic.py, quant_fp8.py and quant_int4.py."""
        calibrates_decoder = {"decode_steps"} if self.needs_calibration and stage_io.DECODER_STAGE in self.stages \
            else set()
        if self.precision == "fp8":
            return ("fp8 quantizes constant-weight MatMuls (the linear layers) only, as E4M3 Q/DQ scaled by amax",
                    {"per_channel"} | calibrates_decoder)
        if self.precision == "int4":
            fmt = self.resolved_int4_format()
            level = {"accuracy_level"} if fmt == "nbits" else set()
            return (f"int4 {fmt} rounds the linear MatMuls' weights in blocks (RTN, weight-only, no calibration"
                    + (", no MatMulNBits accuracy level" if fmt == "qdq" else "") + ")",
                    {"block_size", "int4_format"} | level)
        if self.int8_mode == "w8a8":
            return ("int8 w8a8 writes Q/DQ with per-channel or per-tensor scales (no blocks, no MatMulNBits)",
                    {"op_types", "quantize_attention", "per_channel"} | calibrates_decoder)
        if self.int8_mode == "w8a16":
            if self.resolved_int8_format() == "nbits":
                return ("int8 w8a16 nbits writes the linear layers' weights as MatMulNBits in blocks",
                        {"block_size", "accuracy_level"})
            return ("int8 w8a16 qdq writes the linear layers' weights per channel or per tensor behind a "
                    "DequantizeLinear (no blocks, no MatMulNBits)", {"per_channel"})
        if self._dynamic_keeps_w8a16():
            return ("int8 w8a8-dynamic writes every linear layer's weight per output channel, its MLP down-projections "
                    "as W8A16 MatMulNBits in blocks", {"block_size", "accuracy_level"})
        if self.down_projections == "w8a16":
            return ("int8 w8a8-dynamic writes every linear layer's weight per output channel; its W8A16 "
                    "down-projections are the decoder's, which --stages leaves out (no MatMulNBits)", set())
        return ("int8 w8a8-dynamic writes every linear layer's weight per output channel, its MLP down-projections "
                "SmoothQuant-ed (no blocks, no MatMulNBits)", calibrates_decoder)

    def _dynamic_keeps_w8a16(self) -> bool:
        """w8a8-dynamic writing its MLP down-projections as W8A16 MatMulNBits: they are the decoder's."""
        return self.int8_mode == "w8a8-dynamic" and self.down_projections == "w8a16" and \
            stage_io.DECODER_STAGE in self.stages

    def _check_int8_mode(self) -> None:
        if self.precision != "int8":
            if self.int8_mode is not None or self.int8_format != "auto" or self.down_projections is not None:
                raise ConfigError(f"int8 mode / format / down-projections are int8 options; drop them for "
                                  f"{self.precision}")
            return
        if self.int8_mode is None:
            object.__setattr__(self, "int8_mode", self._default_int8_mode())
        if self.down_projections is not None and self.int8_mode != "w8a8-dynamic":
            raise ConfigError(f"down-projections {self.down_projections!r} is an int8 w8a8-dynamic option, but the "
                              f"int8 mode is {self.int8_mode}: add --int8-mode w8a8-dynamic, or drop it")
        if self.int8_mode not in INT8_MODES:
            raise ConfigError(f"int8 mode {self.int8_mode!r} unknown; use one of {', '.join(INT8_MODES)}")
        if self.int8_format not in INT8_FORMATS:
            raise ConfigError(f"int8 format {self.int8_format!r} unknown; use one of {', '.join(INT8_FORMATS)}")
        if self.int8_mode == "w8a8":
            if self.int8_format != "auto":
                raise ConfigError("int8 format (nbits / qdq) chooses how w8a16 weights are written; w8a8 is always "
                                  "Q/DQ: drop the format or use int8 mode w8a16")
            return
        w8a8_only = self._w8a8_only_options()
        if self.int8_mode == "w8a8-dynamic":
            # SmoothQuant applies there too: to the down-projections, which it moves from W8A16 to per-token int8.
            self._check_dynamic([w for w in w8a8_only if w != "SmoothQuant"])
        elif w8a8_only:
            raise ConfigError(f"int8 mode w8a16 quantizes linear layers' weights only, but {', '.join(w8a8_only)} "
                              "asks for activation quantization (or a quantizer without weight-only int8); "
                              "use int8 mode w8a8, or drop those options")

    def _check_dynamic(self, w8a8_only: list[str]) -> None:
        if self.for_tensorrt:
            raise ConfigError(f"int8 mode w8a8-dynamic runs on onnxruntime (its per-token scales are computed in the "
                              f"graph); TensorRT ({self.target}) cannot build it: use int8 mode w8a16 or w8a8 there")
        if w8a8_only:
            raise ConfigError(f"int8 mode w8a8-dynamic scales activations per token at run time and is written for "
                              f"onnxruntime; {', '.join(w8a8_only)} belong to static w8a8: use int8 mode w8a8, or "
                              "drop those options")
        if self.int8_format not in ("auto", "nbits"):
            raise ConfigError(f"int8 format {self.int8_format!r}: w8a8-dynamic keeps its W8A16 layers as MatMulNBits "
                              "(nbits); drop the format or use int8 mode w8a16")
        down = self.down_projections or "smoothquant"
        if down not in DOWN_PROJECTIONS:
            raise ConfigError(f"down-projections {down!r} unknown; use one of {', '.join(DOWN_PROJECTIONS)}")
        if down == "w8a16" and self.smoothquant_alpha is not None:
            raise ConfigError("SmoothQuant in w8a8-dynamic smooths the down-projections for per-token int8, but "
                              "down-projections w8a16 keeps them weight-only: drop --smoothquant, or use "
                              "--down-projections smoothquant")
        object.__setattr__(self, "down_projections", down)
        # The down-projections are the decoder's: without it nothing is smoothed, and the manifest must not say so.
        decoder = stage_io.DECODER_STAGE in self.stages
        if down == "smoothquant" and self.smoothquant_alpha is not None and not decoder:
            raise ConfigError(f"SmoothQuant in w8a8-dynamic smooths the decoder's MLP down-projections, and stages "
                              f"{list(self.stages)} leave the decoder out: drop --smoothquant, or add the decoder "
                              "to --stages")
        if down == "smoothquant" and self.smoothquant_alpha is None and decoder:
            object.__setattr__(self, "smoothquant_alpha", DYNAMIC_SMOOTHQUANT_ALPHA)

    def _default_int8_mode(self) -> str:
        """w8a8-dynamic on onnxruntime, w8a16 for TensorRT targets, w8a8 when an option only W8A8 has was given.

        Decoding one token reads every weight once and does two FLOPs per weight: on a robot's GPU
        (AGX Orin: 204.8 GB/s) and on a CPU alike the decoder is bandwidth-bound, so what pays there
        is one byte per weight. The ViT and the prompt's prefill are compute-bound, so what pays there
        is int8 arithmetic. w8a8-dynamic gives both on onnxruntime's CPU without calibration: int8
        weights, each token's activations quantized with its own scale at run time, and the decode
        step within a few percent of W8A16's (export/quant_dynamic.py; bench checkpoint: ViT 0.7x,
        prefill 0.8x W8A16's time). TensorRT cannot build it, so TensorRT targets get W8A16 (its
        weight-only INT8 GEMMs). Static W8A8's per-tensor activation ranges come from a calibration
        set, and on onnxruntime's CPU its Q/DQ graph decodes slower than fp32 (it quantizes every
        linear layer's input on each run and leaves some weight DequantizeLinear nodes unfused): it
        is chosen only when asked for (--int8-mode w8a8, or SmoothQuant, attention or more op types).
        """
        if self._w8a8_only_options():
            return "w8a8"
        return "w8a16" if self.for_tensorrt else "w8a8-dynamic"

    def _w8a8_only_options(self) -> list[str]:
        """The options given that mean activation quantization, or a backend without weight-only int8."""
        return [what for what, asked in (
            ("SmoothQuant", self.smoothquant_alpha is not None), ("quantize_attention", self.quantize_attention),
            (f"op types {list(self.op_types)}", self.op_types != ("MatMul",)),
            ("the modelopt backend", self.backend == "modelopt")) if asked]

    @property
    def for_tensorrt(self) -> bool:
        return self.target is not None

    @property
    def needs_calibration(self) -> bool:
        """Activation ranges to measure: int8 w8a8 and fp8; w8a8-dynamic the down-projections' channel ranges
        for SmoothQuant (weight-only recipes have none)."""
        if self.int8_mode == "w8a8-dynamic":     # the down-projections are the decoder's
            return self.down_projections == "smoothquant" and stage_io.DECODER_STAGE in self.stages
        return not self.weight_only

    @property
    def weight_only(self) -> bool:
        """Weights quantized, activations float: no calibration set needed."""
        return self.precision == "int4" or (self.precision == "int8" and self.int8_mode == "w8a16")

    def resolved_int8_format(self) -> str:
        """Like int4: MatMulNBits (bits=8) for onnxruntime, int8 DequantizeLinear + MatMul for TensorRT."""
        if self.int8_format != "auto":
            return self.int8_format
        return "qdq" if self.for_tensorrt else "nbits"

    def resolved_int4_format(self) -> str:
        """MatMulNBits is an onnxruntime contrib op TensorRT cannot parse: TensorRT targets get int4 Q/DQ."""
        if self.int4_format != "auto":
            return self.int4_format
        return "qdq" if self.for_tensorrt else "nbits"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("stages", "op_types", "exclude_nodes"):
            data[key] = list(data[key])
        return data


def _listed(items: list[str], conjunction: str) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {conjunction} {items[-1]}"


def require_targets(nodes: list, stage_file, options: "QuantizeOptions") -> None:
    """A stage whose calibrated recipe found no node to quantize is the options' doing, not the calibration set's:
    say which ones (the op types, the excluded nodes) and how to fix them."""
    if nodes:
        return
    excluded = f" and --exclude-nodes leaves none of its linear layers ({len(options.exclude_nodes)} excluded)" \
        if options.exclude_nodes else ""
    raise ConfigError(f"{getattr(stage_file, 'name', stage_file)}: no node to quantize: --op-types "
                      f"{','.join(options.op_types)} matches none of its constant-weight layers{excluded}; widen "
                      "--op-types, exclude fewer nodes, or leave this stage out of --stages")
