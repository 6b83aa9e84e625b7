"""What `edgeact quantize` may be asked: one validated options record per run, recorded verbatim in the manifest."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgeact.runtime import stage_io
from edgeact.runtime.errors import ConfigError

PRECISIONS = ("int8", "fp8", "int4")
BACKENDS = ("onnxruntime", "modelopt")
INT4_FORMATS = ("auto", "nbits", "qdq")
ARRAY_DTYPES = ("float32", "float16")
# Stages each precision quantizes unless told: INT4 is weight-only, which pays where weights dominate
# (the bandwidth-bound decoder); the small compute-bound ViT gains nothing from it.
DEFAULT_STAGES = {"int8": (stage_io.VISION_STAGE, stage_io.DECODER_STAGE),
                  "fp8": (stage_io.VISION_STAGE, stage_io.DECODER_STAGE),
                  "int4": (stage_io.DECODER_STAGE,)}
# Op types a QDQ recipe may be asked to quantize. Linear layers are MatMul; quantizing Add/Mul/Softmax
# too puts Q/DQ on the residual stream and the attention probabilities, which wrecks a decoder.
QDQ_OP_TYPES = ("MatMul", "Gemm", "Conv", "Add", "Mul", "Softmax", "Gather", "Concat")


@dataclass(frozen=True)
class QuantizeOptions:
    precision: str
    target: str | None = None               # TensorRT target (export/trt_targets.py); None: onnxruntime on a CPU
    stages: tuple[str, ...] | None = None   # default DEFAULT_STAGES[precision]
    op_types: tuple[str, ...] = ("MatMul",)
    exclude_nodes: tuple[str, ...] = ()
    smoothquant_alpha: float | None = None  # int8: SmoothQuant strength in (0, 1); None: off
    per_channel: bool = True                # int8 / fp8 weights: one scale per output channel
    quantize_attention: bool = False        # int8 / fp8: also the activation x activation MatMuls (QK^T, PV)
    block_size: int = 128                   # int4: weights per scale, along the input dim
    accuracy_level: int | None = None       # int4 MatMulNBits compute: 0/None fp32 ... 4 int8 (onnxruntime CPU)
    int4_format: str = "auto"               # nbits: MatMulNBits (onnxruntime); qdq: DequantizeLinear int4 (TensorRT)
    arrays_dtype: str = "float32"           # embedding / lm_head arrays: kept fp32 unless asked
    backend: str = "onnxruntime"
    decode_steps: int = 2                   # decoder calibration: single-token steps per sample besides the chunk
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} unknown; use one of {', '.join(PRECISIONS)}")
        if self.target is not None:
            from edgeact.export.trt_targets import check_precision

            check_precision(self.target, self.precision)   # e.g. fp8 on Orin: names int8 / int4 instead
        object.__setattr__(self, "stages", tuple(self.stages or DEFAULT_STAGES[self.precision]))
        object.__setattr__(self, "op_types", tuple(self.op_types))
        object.__setattr__(self, "exclude_nodes", tuple(self.exclude_nodes))
        unknown = [s for s in self.stages if s not in (stage_io.VISION_STAGE, stage_io.DECODER_STAGE)]
        if unknown or not self.stages:
            raise ConfigError(f"stages {list(self.stages)}: quantize some of {stage_io.VISION_STAGE}, {stage_io.DECODER_STAGE}")
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
            raise ConfigError(f"int4 block size {self.block_size} must be a power of two >= 16 (32, 64 or 128)")
        if self.accuracy_level is not None and self.accuracy_level not in range(5):
            raise ConfigError(f"accuracy level {self.accuracy_level} must be 0-4 (onnxruntime MatMulNBits)")
        for name, value, choices in (("int4 format", self.int4_format, INT4_FORMATS),
                                     ("arrays dtype", self.arrays_dtype, ARRAY_DTYPES), ("backend", self.backend, BACKENDS)):
            if value not in choices:
                raise ConfigError(f"{name} {value!r} unknown; use one of {', '.join(choices)}")
        if self.decode_steps < 0:
            raise ConfigError(f"decode_steps is {self.decode_steps}; use 0 or more")

    @property
    def for_tensorrt(self) -> bool:
        return self.target is not None

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
