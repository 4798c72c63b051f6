"""Lesson 04b: the student on every CPU runtime, from one ``torch.export`` capture.

One module per runtime, each holding the plumbing of that runtime's own path (the lesson's cells
show the library calls themselves):

- :mod:`.onnx_runtime` -- ONNX Runtime fp32 and static INT8 (QDQ) through :mod:`deploylab.export`,
  :mod:`deploylab.onnxrt` and :mod:`deploylab.onnx_int8`;
- :mod:`.openvino_cpu` -- OpenVINO's CPU plugin (``ov.convert_model``, hints, precision) and NNCF INT8;
- :mod:`.executorch_xnnpack` -- ExecuTorch programs lowered to XNNPACK, what was delegated, PT2E INT8;
- :mod:`.inductor` -- AOTInductor packages (``.pt2``) and ``torch.compile``, X86InductorQuantizer INT8;
- :mod:`.harness` -- sizes, thread settings, interleaved rounds with their spread, the matmul floor,
  cold start and peak memory in a fresh process (:mod:`.coldstart`), install sizes;
- :mod:`.choice` -- accuracy with intervals, paired comparisons and the measured choice.

This ``__init__`` imports nothing: executorch, openvino and nncf are heavy imports, loaded only by
the module of their runtime, and no server imports this package.
"""
