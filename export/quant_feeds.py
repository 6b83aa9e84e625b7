"""Calibration inputs for each stage, made by the fp32 bundle from a calibration set, and activation statistics over them.

Vision (the ViT): the sample's preprocessed crops, all in one feed (crops never attend to each
other: a batch gives each crop's activations as a one-crop run does). Connector: the fp32
ViT's patch features of those crops with the sample's pooling indices. Decoder: per sample,
the whole sequence (prompt + the fp32 model's own answer) as one prefill chunk with an empty
cache -- a causal decoder computes the same per-token activations in one chunk as token by
token -- plus single-token decode steps at random answer positions with the real cache before
them (sliced from the chunk's own keys and values: position p's keys do not depend on later
tokens), so the cache inputs and the attention over them see realistic values too.
Feeds are produced lazily: a 7B decoder's cache for one step is gigabytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edgeact.calibration.calibration_set import CalibrationError, CalibrationSet
from edgeact.export.quant_decode import Feeds, OrtBundle, make_session
from edgeact.runtime import stage_io

FeedSource = Callable[[], Iterator[Feeds]]   # a fresh pass over the feeds on every call


def stage_feeds(fp32: OrtBundle, calib: CalibrationSet, stage: str, decode_steps: int = 1, seed: int = 0) -> FeedSource:
    if stage == stage_io.VISION_STAGE:
        return lambda: (fp32.vision_feeds(s.image_inputs()) for s in calib.samples)
    if stage == stage_io.CONNECTOR_STAGE:
        return lambda: (fp32.connector_feeds(s.image_inputs()) for s in calib.samples)
    if stage == stage_io.DECODER_STAGE:
        return lambda: _decoder_feeds(fp32, calib, decode_steps, seed)
    raise KeyError(stage)


def _decoder_feeds(fp32: OrtBundle, calib: CalibrationSet, decode_steps: int, seed: int) -> Iterator[Feeds]:
    rng = np.random.default_rng(seed)
    for sample in calib.samples:
        n_prompt = len(sample.prompt_ids)
        # The final end-of-text is never fed back.
        embeds = fp32.sequence_embeddings(sample.prompt_ids, sample.image_inputs(), sample.answer_ids[:-1])
        yield fp32.decoder_feeds(embeds, 0, fp32.empty_past())
        if decode_steps < 1 or embeds.shape[1] <= n_prompt:
            continue
        keys, values = fp32.cache_after(embeds)
        for p in sorted(rng.integers(n_prompt, embeds.shape[1], size=decode_steps)):
            past = fp32.stages.cache.layout.past_from(keys, values, int(p))
            yield fp32.decoder_feeds(embeds[:, p:p + 1], int(p), past)


class FeedReader:
    """A CalibrationDataReader over a FeedSource: rewindable, with the `get_first` ModelOpt asks for."""

    def __init__(self, source: FeedSource) -> None:
        self.source = source
        self._it = self.source()

    def get_next(self) -> Feeds | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self.source()

    def get_first(self) -> Feeds | None:
        return next(self.source(), None)


def as_calibration_reader(source: FeedSource):
    """A FeedReader that onnxruntime's quantize_static accepts (it checks the base class)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(FeedReader, CalibrationDataReader):
        pass

    return _Reader(source)


# ----------------------------------------------------------------------------- statistics
def const_weight_matmuls(proto, op_types: tuple[str, ...] = ("MatMul",), exclude: tuple[str, ...] = ()):
    """Nodes of `op_types` whose second input is a 2-D float initializer: the model's linear layers."""
    import onnx

    inits = {t.name: t for t in proto.graph.initializer}
    nodes = []
    for node in proto.graph.node:
        if node.op_type not in op_types or node.name in exclude or len(node.input) < 2:
            continue
        weight = inits.get(node.input[1])
        if weight is not None and len(weight.dims) == 2 and weight.data_type == onnx.TensorProto.FLOAT:
            nodes.append(node)
    return nodes


@dataclass
class TensorStats:
    """Range of one tensor over all calibration feeds; `channel_absmax` over the last axis when asked for (SmoothQuant's
    linear-layer inputs, whose last axis is the hidden size: the same in every feed), else None."""
    min: float
    max: float
    channel_absmax: np.ndarray | None = None

    @property
    def absmax(self) -> float:
        return max(-self.min, self.max, 0.0)

    def update(self, value: np.ndarray) -> None:
        self.min, self.max = min(self.min, float(value.min())), max(self.max, float(value.max()))
        if self.channel_absmax is not None:
            np.maximum(self.channel_absmax, _channel_absmax(value), out=self.channel_absmax)


def _channel_absmax(value: np.ndarray) -> np.ndarray:
    return np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)


def tensor_stats(model_path: str | Path, tensor_names: list[str], feeds: FeedSource, work_dir: Path,
                 threads: int | None = None, channels: bool = True) -> dict[str, TensorStats]:
    """Ranges of the named tensors, reduced feed by feed (never holding a feed's activations past its run).

    Min and max always; `channels` (SmoothQuant's): also the absmax of each channel of the last axis, which must then
    have one width in every feed (a linear layer's input; not an attention product's or a Softmax's, whose last axis
    is the sequence length). Recipes that need ranges only pass channels=False.
    """
    import onnx

    proto = onnx.load(str(model_path))
    known = {o.name for o in proto.graph.output}
    for name in tensor_names:
        if name not in known:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    path = Path(work_dir) / "stats_probe.onnx"
    save_onnx(proto, path)
    del proto
    session = make_session(path, threads)
    names = {i.name for i in session.get_inputs()}
    stats: dict[str, TensorStats] = {}
    for feed in feeds():
        for name, value in zip(tensor_names, session.run(tensor_names, {k: v for k, v in feed.items() if k in names})):
            if value.size == 0 or value.dtype.kind != "f":
                continue        # an empty cache has no values to range; indices are not quantized
            if name not in stats:
                stats[name] = TensorStats(float(value.min()), float(value.max()),
                                          _channel_absmax(value) if channels else None)
                continue
            seen = stats[name].channel_absmax
            if seen is not None and seen.shape[0] != value.shape[-1]:
                raise CalibrationError(f"tensor {name!r}: its last axis is {seen.shape[0]} wide in one calibration "
                                       f"feed and {value.shape[-1]} in another, so it has no per-channel ranges "
                                       "(SmoothQuant smooths linear layers' inputs only); exclude the node that "
                                       "reads it with --exclude-nodes, or drop --smoothquant")
            stats[name].update(value)
    if not stats:
        raise CalibrationError("the calibration feeds produced no values; give a calibration set with samples")
    return stats


def is_big(proto) -> bool:
    # protobuf cannot serialize a message over 2 GB: big models go to an external-data file.
    return sum(len(t.raw_data) for t in proto.graph.initializer) > (1 << 30)


def save_onnx(proto, path: Path) -> None:
    """Save a stage; a big one keeps its weights beside it in `<name>.data`."""
    import onnx

    onnx.save_model(proto, str(path), save_as_external_data=is_big(proto), all_tensors_to_one_file=True,
                    location=f"{path.name}.data")


def replace_nodes(proto, nodes) -> None:
    """Make `nodes` the graph's node list and drop the initializers no node reads any more."""
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    still_read = {i for n in proto.graph.node for i in n.input}
    kept = [t for t in proto.graph.initializer if t.name in still_read]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
