"""Cold start of one deployed artefact, run as a *script* in a fresh process (lesson 04b).

``python deploylab/backends/coldstart.py KIND ARTEFACT INPUT.npy THREADS [OUTPUT.npy]``

Run as a file, not as ``-m deploylab...``: importing the ``deploylab`` package imports PyTorch,
which an ONNX Runtime or OpenVINO server never loads. So this file imports only the standard
library, NumPy and the one runtime it measures -- and never the model's Python class. It prints
one JSON line: seconds to import the runtime, to load the artefact, for the first answer, and the
process's peak resident memory; with OUTPUT.npy it also saves the logits (for parity checks).
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np


def _onnxruntime(path: str, threads: int):
    import onnxruntime as ort

    def load():
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]
    return load


def _openvino(path: str, threads: int):
    import openvino as ov

    def load():
        compiled = ov.Core().compile_model(path, "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False})
        request = compiled.create_infer_request()
        return lambda x: request.infer([x])[0]
    return load


def _executorch(path: str, threads: int):
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    def load():
        portable_lib._unsafe_reset_threadpool(threads)  # its C++ log lines go to this child's stderr, not the caller's
        method = Runtime.get().load_program(path).load_method("forward")
        import torch

        return lambda x: method.execute([torch.from_numpy(x)])[0].numpy()
    return load


def _aotinductor(path: str, threads: int):
    import torch
    import torch._inductor

    def load():
        torch.set_num_threads(threads)
        runner = torch._inductor.aoti_load_package(path)

        def run(x):
            with torch.inference_mode():
                return runner(torch.from_numpy(x)).numpy()
        return run
    return load


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: it survives ``exec`` on Linux, so a
    child started from a large notebook kernel would report the kernel's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # macOS: bytes there, and no exec carry-over issue here


KINDS = {"onnxruntime": _onnxruntime, "openvino": _openvino, "executorch": _executorch, "aotinductor": _aotinductor}


def main(argv: list[str]) -> dict[str, float]:
    """Import, load, answer once; return the timings and peak memory (and save the logits if asked)."""
    kind, path, inputs, threads = argv[0], argv[1], argv[2], int(argv[3])
    x = np.load(inputs)
    t0 = time.perf_counter()
    load = KINDS[kind](path, threads)
    t1 = time.perf_counter()
    run = load()
    t2 = time.perf_counter()
    logits = np.asarray(run(x))
    t3 = time.perf_counter()
    if len(argv) > 4:
        np.save(argv[4], logits)
    return {"import_s": t1 - t0, "load_s": t2 - t1, "first_s": t3 - t2,
            "peak_rss_mb": peak_rss_mb(),
            "torch_imported": "torch" in sys.modules}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
