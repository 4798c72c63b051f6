"""TorchServe handler for the deploylab Fashion-MNIST classifier (lesson 05).

It serves the exported student through ONNX Runtime (``backend: onnx``, the default), an
ExecuTorch program (``backend: executorch``, a ``.pte`` file: the runtime lesson 04b chose) or the
PyTorch checkpoint (``backend: pytorch``), chosen in the ``handler:`` section of the archive's
model-config.yaml. ONNX and ExecuTorch load through ``deploylab.serving.predictor.load``, which
checks the file's sha256 against its model card. One request carries one image, either

- PNG or JPEG bytes (any content type; grayscale or colour, square, at most ``max_side`` pixels), or
- a JSON array of pixels: ``[[0, 12, ...], ...]`` (H x H integers in 0..255) or
  ``{"pixels": [[...], ...]}``.

Decoding and validation are ``deploylab.serving.protocol`` (the same code as every other server of
the course); preprocessing is ``deploylab.data.preprocess``, imported -- the same code that made the training
inputs -- so served and in-process predictions agree. Responses are JSON:
``{"predictions": [{"label": "Trouser", "index": 1, "probability": 0.97}, ...]}`` (top-k).

Bad input never becomes a 500 and never kills the worker: every request of a batch is decoded on
its own, and whatever its decoding raised, a request that fails gets its own 4xx status (``context.set_response_status``) and a JSON
body ``{"code": 400, "type": "BadRequest", "message": "..."}``, while the other requests of the same
batch are answered normally. (Raising ``ts.utils.util.PredictionException(message, 400)`` would
also give a 4xx, but for the *whole* batch: one bad request would fail its neighbours.)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from deploylab import data as dl_data
from deploylab.serving import predictor, protocol
from deploylab.serving.protocol import BadRequest  # imported, not defined here: TorchServe wants one class per handler file

log = logging.getLogger(__name__)
RUNTIMES = {"onnx": "onnxruntime", "executorch": "executorch"}  # handler.backend -> predictor's runtime

DEFAULTS = {
    "backend": "onnx",  # or "executorch", "pytorch"
    "top_k": 3,
    **protocol.LIMITS,  # the input limits of every server (the frontend's max_request_size is a second, outer one)
    "intra_op_threads": 1,  # per worker: workers x threads should not exceed the cores
}


def _payload(request: dict[str, Any]) -> Any:
    """The body of one request: 'data' (multipart field) or 'body' (raw POST), else the first value."""
    for key in ("data", "body"):
        if key in request and request[key] is not None:
            return request[key]
    values = [v for v in request.values() if v is not None]
    return values[0] if values else None


def decode(request: dict[str, Any], limits: dict[str, Any]) -> np.ndarray:
    """One request -> uint8 (H, H) pixels, or :class:`BadRequest` saying what to send instead
    (``protocol.decode_value``: the same validation as the serverless function and the custom server)."""
    return protocol.decode_value(_payload(request), limits)


class DeploylabHandler(BaseHandler):
    """initialize / preprocess / inference / postprocess, with per-request errors (see module doc)."""

    def initialize(self, context) -> None:
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        self.context, self.manifest = context, context.manifest
        self.cfg = {**DEFAULTS, **(context.model_yaml_config or {}).get("handler", {})}
        self.labels = json.loads((model_dir / "index_to_name.json").read_text())
        serialized = model_dir / self.manifest["model"]["serializedFile"]
        threads = int(self.cfg["intra_op_threads"])
        if self.cfg["backend"] in RUNTIMES:
            # checks the file's sha256 against its model card (shipped in the archive) before serving
            self.session = predictor.load(serialized, runtime=RUNTIMES[self.cfg["backend"]], threads=threads)
            self.card, self.model = self.session.card, None
        elif self.cfg["backend"] == "pytorch":
            from deploylab import models  # lazy: only this backend needs torchvision, the serving image has none

            meta = json.loads(serialized.with_suffix(".json").read_text())
            torch.set_num_threads(threads)
            self.model = models.build(meta["arch"])
            self.model.load_state_dict(torch.load(serialized, map_location="cpu", weights_only=True))
            self.model.eval()
            self.session, self.card = None, meta
        else:
            raise ValueError(f"handler.backend must be 'onnx', 'executorch' or 'pytorch', got {self.cfg['backend']!r}")
        self.initialized = True
        log.info("deploylab handler ready: backend=%s, threads=%d, pid=%d", self.cfg["backend"], threads, os.getpid())

    def preprocess(self, data: list[dict[str, Any]]) -> tuple[torch.Tensor | None, list[BadRequest | None]]:
        """Decode every request on its own; stack the good ones through ``data.preprocess``.

        Whatever one request raises fails that request only (``protocol.refusal``: a 4xx, and an
        unforeseen error logged), never the batch it shares with others.
        """
        images, errors = [], []
        for request in data:
            try:
                images.append(dl_data.preprocess(decode(request, self.cfg)))
                errors.append(None)
            except Exception as e:
                errors.append(protocol.refusal(e))
        return (torch.cat(images) if images else None), errors

    def inference(self, x: torch.Tensor) -> np.ndarray:
        """Logits for a batch of preprocessed images."""
        if self.session is not None:
            return self.session.run(x.numpy())
        with torch.inference_mode():
            return self.model(x).numpy()

    def postprocess(self, logits: np.ndarray) -> list[dict[str, Any]]:
        """Top-k labels (from the archive's index_to_name.json) and softmax probabilities per image."""
        names = [self.labels[str(i)] for i in range(len(self.labels))]
        return protocol.top_k(logits, self.cfg["top_k"], names)

    def handle(self, data: list[dict[str, Any]], context) -> list[Any]:
        """One answer per request: predictions for good ones, a JSON 4xx for bad ones."""
        self.context = context
        x, errors = self.preprocess(data)
        answers = iter(self.postprocess(self.inference(x)) if x is not None else [])
        out: list[Any] = []
        for idx, err in enumerate(errors):
            if err is None:
                out.append(next(answers))
            else:
                context.set_response_status(err.code, err.message[:200], idx)
                out.append(err.body())
            context.set_response_content_type(idx, "application/json")
        return out
