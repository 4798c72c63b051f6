"""Static INT8 with ONNX Runtime (lesson 04): ``quantize_static`` calibrated on real images.

- :class:`CalibrationReader` -- real preprocessed training images, ``batch_size`` at a time;
- :func:`quantize_int8` -- ``quant_pre_process``, calibration, the quantized graph in one of
  :data:`INT8_CONFIGS` (QDQ or QOperator, per-channel or per-tensor).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from .files import atomic_path
from .hardware import cpu_flags
from .onnxrt import INPUT_NAME, as_float32


class QuantizationError(RuntimeError):
    """Static quantization produced something that must not be used."""


# --------------------------------------------------------------------------------------------
# Static INT8
# --------------------------------------------------------------------------------------------


class CalibrationReader(CalibrationDataReader):
    """Feeds real preprocessed images to ``quantize_static``, ``batch_size`` at a time.

    Use ``data.calibration_set(n)`` (training images, never test images). An empty or malformed
    set raises at construction: ``quantize_static`` would otherwise fail deep inside with an
    obscure error, or calibrate on nothing.
    """

    def __init__(self, images: torch.Tensor | np.ndarray, input_name: str = INPUT_NAME, batch_size: int = 32):
        arr = as_float32(images) if len(images) else np.empty((0,))
        if arr.size == 0 or len(arr) == 0:
            raise ValueError("the calibration reader got no images: pass real preprocessed images, "
                             "e.g. data.calibration_set(profile.calibration_images)")
        if arr.ndim != 4:
            raise ValueError(f"calibration images must be a batch (N, C, H, W), got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("calibration images contain NaN or infinity")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.images, self.input_name, self.batch_size = arr, input_name, batch_size
        self.batches_read = 0
        self._iter = self._batches()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self.images), self.batch_size):
            yield {self.input_name: self.images[i : i + self.batch_size]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        if batch is not None:
            self.batches_read += 1
        return batch

    def rewind(self) -> None:
        """Start again from the first batch (ONNX Runtime may read the data more than once)."""
        self._iter = self._batches()

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)


@dataclass(frozen=True)
class Int8Config:
    """One ONNX Runtime static-quantization configuration."""

    format: str = "qdq"  # "qdq" (QuantizeLinear/DequantizeLinear pairs) or "qoperator" (QLinearConv...)
    per_channel: bool = True
    reduce_range: bool | None = None  # None: True only on CPUs without VNNI (ONNX Runtime's advice)

    @property
    def name(self) -> str:
        return f"{self.format} {'per-channel' if self.per_channel else 'per-tensor'}"

    def to_dict(self) -> dict:
        return {**asdict(self), "reduce_range": self.effective_reduce_range()}

    def effective_reduce_range(self) -> bool:
        if self.reduce_range is not None:
            return self.reduce_range
        flags = cpu_flags()
        return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


INT8_CONFIGS = tuple(Int8Config(fmt, pc) for fmt in ("qdq", "qoperator") for pc in (True, False))


def quantize_int8(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration: CalibrationReader,
    cfg: Int8Config = Int8Config(),
) -> Path:
    """Static INT8 of an fp32 ONNX file with ``onnxruntime.quantization.quantize_static``.

    Steps: ``quant_pre_process`` (shape inference and graph clean-up that the quantizer needs),
    then calibration (MinMax ranges of every activation over the calibration images), then the
    quantized graph in ``cfg.format``. Activations are uint8 and weights int8 (ONNX Runtime's
    advice for x86). Written to a temporary file and renamed on success.
    """
    if not isinstance(calibration, CalibrationReader):
        raise TypeError("calibration must be an onnx_int8.CalibrationReader over real images")
    if cfg.format not in ("qdq", "qoperator"):
        raise ValueError(f"format must be 'qdq' or 'qoperator', got {cfg.format!r}")
    out_path = Path(out_path)
    calibration.rewind()
    with tempfile.TemporaryDirectory(prefix="deploylab-int8-") as tmpdir:
        pre = Path(tmpdir) / "preprocessed.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        with atomic_path(out_path) as tmp:
            quantize_static(
                str(pre), str(tmp), calibration,
                quant_format=QuantFormat.QDQ if cfg.format == "qdq" else QuantFormat.QOperator,
                per_channel=cfg.per_channel, reduce_range=cfg.effective_reduce_range(),
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    if calibration.batches_read == 0:
        raise QuantizationError("quantize_static read no calibration batch; the INT8 ranges would be meaningless")
    return out_path


@dataclass(frozen=True)
class RoundsComparison:
    """Two variants timed in the same interleaved rounds: the per-round differences ``a - b`` (ms).

    A difference counts as beyond noise only when every round agrees on its sign and there are
    enough rounds for that to be unlikely by chance (a two-sided sign test: ``2 / 2**rounds <= 0.05``,
    so at least 6 rounds); otherwise it is *within noise*, however large the median looks.
    """

    a: str
    b: str
    differences: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(np.median(self.differences))

    @property
    def p_value(self) -> float:
        """Two-sided sign test for "every round agrees" (1.0 when they do not all agree)."""
        d = self.differences
        same = all(x > 0 for x in d) or all(x < 0 for x in d)
        return min(1.0, 2 * 0.5 ** len(d)) if same else 1.0

    @property
    def beyond_noise(self) -> bool:
        return self.p_value <= 0.05

    def verdict(self) -> str:
        lo, hi = min(self.differences), max(self.differences)
        span = f"{len(self.differences)} rounds, {self.a} - {self.b} from {lo:+.3f} to {hi:+.3f} ms (median {self.median:+.3f})"
        if not self.beyond_noise:
            return f"within noise ({span}: the rounds do not all agree, or are too few)"
        faster = self.b if self.median > 0 else self.a
        return f"{faster} faster beyond noise ({span}; sign test p = {self.p_value:.3f})"


def compare_rounds(a: str, a_ms: Sequence[float], b: str, b_ms: Sequence[float]) -> RoundsComparison:
    """Pair the per-round latencies (ms) of ``a`` and ``b``, measured in the same rounds."""
    if len(a_ms) != len(b_ms) or not len(a_ms):
        raise ValueError(f"need the same, non-zero number of rounds for both, got {len(a_ms)} and {len(b_ms)}")
    return RoundsComparison(a, b, tuple(float(x) - float(y) for x, y in zip(a_ms, b_ms)))
