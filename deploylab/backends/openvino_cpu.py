"""OpenVINO's CPU plugin (lesson 04b): conversion, compile settings, NNCF INT8.

- :func:`cpu_config` -- the compile properties the lesson sets and prints: one stream, a latency hint,
  explicit threads, and the inference precision. OpenVINO's CPU plugin *computes in bf16 by default*
  on CPUs with AVX512-BF16 or AMX, so an "fp32" model that is not told ``INFERENCE_PRECISION_HINT=f32``
  runs, and scores, as bf16 there;
- :func:`save` -- ``ov.save_model`` without its default fp16 compression of the weights, both files
  (.xml graph, .bin weights) renamed into place only when complete;
- :func:`quantize` -- ``nncf.quantize`` on the model converted from the ONNX file (from the
  ExportedProgram with a dynamic batch, the quantized model failed to compile: "No suitable
  implementations"), calibrated on training images.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import openvino as ov
import torch

from .. import config

RUNTIME = "openvino"
INSTALL = ("openvino", "openvino-telemetry")


def cpu_config(threads: int = config.BENCH_THREADS, precision: str | None = "f32") -> dict[str, Any]:
    """Compile properties: latency hint, one stream, ``threads`` threads, no pinning, ``precision`` (None: the plugin's default)."""
    cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": threads,
                           "ENABLE_CPU_PINNING": False}
    if precision is not None:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    return cfg


def compile_cpu(model: ov.Model | str | os.PathLike, threads: int = config.BENCH_THREADS,
                precision: str | None = "f32") -> ov.CompiledModel:
    """``core.compile_model(model, "CPU", cpu_config(...))``."""
    return ov.Core().compile_model(model if isinstance(model, ov.Model) else str(model), "CPU",
                                   cpu_config(threads, precision))


def runtime_properties(compiled: ov.CompiledModel) -> dict[str, str]:
    """The properties the plugin actually chose (what a hint turned into on this CPU)."""
    keys = ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS", "ENABLE_CPU_PINNING")
    values = {k: compiled.get_property(k) for k in keys}
    return {k: v.get_type_name() if hasattr(v, "get_type_name") else str(v) for k, v in values.items()}


def runner(compiled: ov.CompiledModel):
    """A one-argument function (torch batch in, logits tensor out) over one infer request."""
    request = compiled.create_infer_request()
    return lambda x: torch.from_numpy(request.infer([x.numpy()])[0])


def save(model: ov.Model, xml_path: Path) -> Path:
    """``ov.save_model`` with fp32 weights (``compress_to_fp16=False``); .xml and .bin renamed into place together."""
    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=xml_path.parent, prefix=".ov-") as tmp:
        ov.save_model(model, str(Path(tmp) / xml_path.name), compress_to_fp16=False)
        os.replace(Path(tmp) / xml_path.with_suffix(".bin").name, xml_path.with_suffix(".bin"))
        os.replace(Path(tmp) / xml_path.name, xml_path)
    return xml_path


def artefact_bytes(xml_path: Path) -> int:
    """Size of the deployable pair: the .xml graph and its .bin weights."""
    return Path(xml_path).stat().st_size + Path(xml_path).with_suffix(".bin").stat().st_size


def quantize(onnx_path: Path, calibration: torch.Tensor, xml_path: Path) -> tuple[ov.Model, Path]:
    """INT8 with NNCF's post-training quantization of the model converted from the ONNX file; saved as .xml/.bin."""
    import nncf

    items = [x.numpy()[None] for x in calibration]  # one image per item: subset_size counts items
    dataset = nncf.Dataset(items)
    quantized = nncf.quantize(ov.convert_model(str(onnx_path)), dataset, subset_size=len(items),
                              preset=nncf.QuantizationPreset.PERFORMANCE)
    return quantized, save(quantized, xml_path)
