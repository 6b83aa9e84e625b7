"""The MolmoAct `config.json` schema as typed dataclasses, shared by export and runtime (no torch).

Field names are exactly the checkpoint's keys (see MOLMOACT_FORMAT.md), so a config
round-trips to a file a published MolmoAct loader reads, and a published config loads here.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeact.runtime.errors import CheckpointError

MODEL_TYPE = "molmoact"
ARCHITECTURE = "MolmoActForActionReasoning"
VARIANTS = ("D", "O")


@dataclass
class VitConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 72
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    image_default_input_size: list[int] = field(default_factory=lambda: [378, 378])
    image_patch_size: int = 14
    image_num_pos: int = 729
    float32_attention: bool = True
    use_cls_token: bool = False
    patch_bias: bool = True
    pre_layernorm: bool = False

    @property
    def patches_per_side(self) -> tuple[int, int]:
        h, w = self.image_default_input_size
        return h // self.image_patch_size, w // self.image_patch_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.image_patch_size * self.image_patch_size


@dataclass
class AdapterConfig:
    vit_layers: list[int] = field(default_factory=lambda: [-3, -9])
    hidden_size: int = 1152
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 72
    float32_attention: bool = True
    hidden_act: str = "silu"
    intermediate_size: int = 18944
    text_hidden_size: int = 3584
    image_padding_embed: str | None = None
    # MolmoAct pools with query = mean of all 4 slots (padding slots zeroed) and no key mask;
    # Molmo2-style configs set this to mean over valid slots and mask padding keys.
    pooling_attention_mask: bool = False


@dataclass
class LlmConfig:
    hidden_size: int = 3584
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int = 128
    vocab_size: int = 152064
    additional_vocab_size: int = 128
    qkv_bias: bool = True
    num_hidden_layers: int = 28
    intermediate_size: int = 18944
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None
    use_qk_norm: bool = False
    qk_norm_type: str = "olmo"
    layer_norm_eps: float = 1e-6
    norm_after: bool = False
    tie_word_embeddings: bool = False


@dataclass
class ArmConfig:
    vit_config: VitConfig
    adapter_config: AdapterConfig
    llm_config: LlmConfig
    image_patch_id: int
    n_action_bins: int = 256
    norm_stats: dict[str, Any] = field(default_factory=dict)
    model_type: str = MODEL_TYPE
    architectures: list[str] = field(default_factory=lambda: [ARCHITECTURE])
    # Keys of a published config that this schema does not model are kept verbatim.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        """'D' (SigLIP2 + Qwen2) or 'O' (CLIP + OLMo2), read off the architecture flags."""
        return "O" if self.vit_config.use_cls_token else "D"

    def to_dict(self) -> dict[str, Any]:
        adapter = dataclasses.asdict(self.adapter_config)
        if not adapter["pooling_attention_mask"]:   # MolmoAct's pooling: the published schema has no such key
            del adapter["pooling_attention_mask"]
        out: dict[str, Any] = {
            "model_type": self.model_type,
            "architectures": list(self.architectures),
            "vit_config": dataclasses.asdict(self.vit_config),
            "adapter_config": adapter,
            "llm_config": dataclasses.asdict(self.llm_config),
            "image_patch_id": self.image_patch_id,
            "n_action_bins": self.n_action_bins,
            "norm_stats": self.norm_stats,
        }
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> "ArmConfig":
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: the top level is a JSON {_json_type(data)}, not an object; a MolmoAct "
                                  "config.json is an object with model_type, vit_config, adapter_config, llm_config "
                                  "and image_patch_id: re-download or re-export the checkpoint")
        if data.get("model_type") != MODEL_TYPE:
            raise CheckpointError(
                f"{source}: model_type is {data.get('model_type')!r}, expected {MODEL_TYPE!r}; "
                "is this a MolmoAct checkpoint?"
            )
        subs = {}
        for key, klass in (("vit_config", VitConfig), ("adapter_config", AdapterConfig), ("llm_config", LlmConfig)):
            if key not in data or not isinstance(data[key], dict):
                what = (f"missing sub-config {key!r}" if key not in data
                        else f"sub-config {key!r} is a JSON {_json_type(data[key])}, not an object")
                raise CheckpointError(f"{source}: {what}; a MolmoAct config has vit_config, adapter_config and "
                                      "llm_config")
            subs[key] = _build(klass, data[key], f"{source}: {key}")
        if "image_patch_id" not in data:
            raise CheckpointError(f"{source}: missing key 'image_patch_id' (the token id of <im_patch>)")
        known = {"model_type", "architectures", "vit_config", "adapter_config", "llm_config",
                 "image_patch_id", "n_action_bins", "norm_stats"}
        for key, value in (("image_patch_id", data["image_patch_id"]),
                           ("n_action_bins", data.get("n_action_bins", 256))):
            if not _is_int(value):
                raise CheckpointError(f"{source}: {key} is {value!r}; it must be a whole number ({_MEANING[key]})")
        architectures = data.get("architectures", [ARCHITECTURE])
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            raise CheckpointError(f"{source}: architectures is {architectures!r}; it must be a list of class names, "
                                  f"e.g. [{ARCHITECTURE!r}]")
        cfg = cls(
            image_patch_id=data["image_patch_id"],
            n_action_bins=data.get("n_action_bins", 256),
            norm_stats=data.get("norm_stats") or {},
            architectures=list(architectures),
            extra={k: v for k, v in data.items() if k not in known},
            **subs,
        )
        cfg.validate(source)
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "ArmConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: not found; a checkpoint directory needs config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc}); the file is corrupt or not the checkpoint's "
                                  "config.json: re-download or re-export the checkpoint") from None
        return cls.from_dict(data, str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def validate(self, source: str = "config.json") -> None:
        v, a, l = self.vit_config, self.adapter_config, self.llm_config
        if v.use_cls_token and not l.use_qk_norm or (not v.use_cls_token and l.norm_after):
            raise CheckpointError(
                f"{source}: unknown variant (use_cls_token={v.use_cls_token}, use_qk_norm={l.use_qk_norm}, "
                f"norm_after={l.norm_after}); edgeact supports -D (SigLIP2 ViT + Qwen2: no CLS, no QK-norm) "
                "and -O (CLIP ViT with CLS + OLMo2: QK-norm, norm after)"
            )
        if v.hidden_act not in ("gelu_pytorch_tanh", "quick_gelu", "gelu"):
            raise CheckpointError(f"{source}: vit_config.hidden_act {v.hidden_act!r} unknown; use gelu_pytorch_tanh (SigLIP2) or quick_gelu (CLIP)")
        if len(v.image_default_input_size) != 2:
            raise CheckpointError(f"{source}: vit_config.image_default_input_size is {v.image_default_input_size}; "
                                  "give [height, width] in pixels, e.g. [378, 378]")
        ph, pw = v.patches_per_side
        expected_pos = ph * pw + (1 if v.use_cls_token else 0)
        if v.image_num_pos != expected_pos:
            raise CheckpointError(f"{source}: vit_config.image_num_pos is {v.image_num_pos}, expected {expected_pos} for {v.image_default_input_size} px at patch {v.image_patch_size}")
        if a.hidden_size != v.hidden_size:
            raise CheckpointError(f"{source}: adapter_config.hidden_size {a.hidden_size} must equal vit_config.hidden_size {v.hidden_size}")
        if a.text_hidden_size != l.hidden_size:
            raise CheckpointError(f"{source}: adapter_config.text_hidden_size {a.text_hidden_size} must equal llm_config.hidden_size {l.hidden_size}")
        for lay in a.vit_layers:
            if not -v.num_hidden_layers <= lay < v.num_hidden_layers:
                raise CheckpointError(f"{source}: adapter_config.vit_layers has {lay}, outside the ViT's {v.num_hidden_layers} layers")
        if l.num_attention_heads % l.num_key_value_heads:
            raise CheckpointError(f"{source}: llm_config.num_attention_heads {l.num_attention_heads} is not a multiple of num_key_value_heads {l.num_key_value_heads}")
        if not 0 <= self.image_patch_id < l.vocab_size + l.additional_vocab_size:
            raise CheckpointError(f"{source}: image_patch_id {self.image_patch_id} outside the embedding table ({l.vocab_size}+{l.additional_vocab_size})")
        if a.image_padding_embed not in (None, "pad_and_partial_pad", "pad_embed", "regress"):
            raise CheckpointError(f"{source}: adapter_config.image_padding_embed {a.image_padding_embed!r} unknown")
        from edgeact.runtime.action_bins import N_ACTION_BINS

        if self.n_action_bins != N_ACTION_BINS:
            raise CheckpointError(f"{source}: n_action_bins {self.n_action_bins}, but MolmoAct's actions are "
                                  f"{N_ACTION_BINS} bins over [-1, 1] (the last {N_ACTION_BINS} ids of the base "
                                  f"vocabulary), the only layout edgeact decodes; a checkpoint with other bins would "
                                  "be decoded wrongly")
        positive = (("vit_config.layer_norm_eps", v.layer_norm_eps), ("llm_config.layer_norm_eps", l.layer_norm_eps),
                    ("llm_config.rope_theta", l.rope_theta),
                    ("llm_config.max_position_embeddings", l.max_position_embeddings))
        for name, value in positive:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise CheckpointError(f"{source}: {name} is {value!r}; it must be a positive number (MolmoAct-7B-D: "
                                      "layer_norm_eps 1e-6, rope_theta 1000000, max_position_embeddings 4096)")


# Keys of the sub-configs that a config may leave out (MOLMOACT_FORMAT.md lists the others, and published configs
# give them all): edgeact's own pooling flag, and keys whose default is what MolmoAct does (newer transformers write
# rope_parameters for rope_scaling; tie_word_embeddings is a base-class attribute).
OPTIONAL_KEYS = frozenset({"pooling_attention_mask", "rope_scaling", "qk_norm_type", "tie_word_embeddings"})
_MEANING = {"image_patch_id": "the token id of <im_patch>", "n_action_bins": "MolmoAct: 256"}


def _json_type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_type(name: str, value: Any, default: Any, where: str) -> None:
    """A key the file gives must be of its default's JSON type (ints for sizes, lists of ints for the layer lists)."""
    if isinstance(default, bool):
        ok, wanted = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, wanted = _is_int(value), "a whole number"
    elif isinstance(default, float):
        ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, wanted = isinstance(value, str), "a string"
    elif isinstance(default, list):
        ok, wanted = isinstance(value, list) and all(_is_int(v) for v in value), "a list of whole numbers"
    else:
        return      # null-able keys (image_padding_embed, rope_scaling): checked where they are used
    if not ok:
        raise CheckpointError(f"{where}.{name} is {value!r}; it must be {wanted} (MolmoAct-7B-D: {default!r})")


def _build(klass, data: dict[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(klass)}
    missing = [name for name in fields if name not in OPTIONAL_KEYS and name not in data]
    if missing:
        # A default would be MolmoAct-7B-D's size, not this checkpoint's: the error would then blame a value the
        # file does not hold.
        raise CheckpointError(f"{where} is missing {', '.join(map(repr, missing))}; a MolmoAct config.json gives "
                              "every key of its sub-configs (MOLMOACT_FORMAT.md): put it back from the checkpoint's "
                              "original config.json, or re-download or re-export the checkpoint")
    for name, f in fields.items():
        if name in data:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            _check_type(name, data[name], default, where)
    # Unknown keys in a sub-config are tolerated (published configs carry extras such as
    # initializer ranges); only the keys we model are read.
    return klass(**{k: v for k, v in data.items() if k in fields})
