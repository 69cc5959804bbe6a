"""The embedded Triton's model: a Triton Python-backend model (``model.py`` in the repository that
``service.embedded_triton`` writes) running the bundle's ONNX in onnxruntime inside the backend's stub
process, next to Triton: no further hop to another process.

Self-contained on purpose: Triton's stub loads this file by path, with the gateway's interpreter and
site-packages but not the ``service`` package; ``triton_python_backend_utils`` exists only inside the stub.
"""

from __future__ import annotations

import json

import numpy as np


def run_batch(session, input_name: str, output_names: tuple[str, ...],
              requests: list[tuple[np.ndarray, tuple[str, ...]]]) -> list[dict[str, np.ndarray]]:
    """One onnxruntime run for a dynamic batch of ``(pixels, requested output names)``, computing only the
    outputs some request names and giving each request only its own rows of those (an embeddings request
    does not pay for ``patch_tokens``: ~150 KB per image at 192 dims). A request naming no output gets all
    of them, as KServe v2 specifies."""
    asked = [names or output_names for _, names in requests]
    wanted = [n for n in output_names if any(n in names for names in asked)]
    pixels = [p for p, _ in requests]
    values = dict(zip(wanted, session.run(wanted, {input_name: np.concatenate(pixels) if len(pixels) > 1
                                                   else pixels[0]})))
    responses, start = [], 0
    for names, batch in zip(asked, pixels):
        stop = start + len(batch)
        responses.append({n: values[n][start:stop] for n in names})
        start = stop
    return responses


def session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    # Idle intra-op threads spinning for the next run would take the cores from the gateway's decoding
    # threads and event loop between requests.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class TritonPythonModel:
    """Triton's Python-backend interface: ``initialize`` once per instance, ``execute`` per dynamic batch."""

    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.session = ort.InferenceSession(parameters["onnx_path"],
                                            session_options(int(parameters.get("intra_op_threads", "0"))),
                                            providers=["CPUExecutionProvider"])
        self.input_name = config["input"][0]["name"]
        self.output_names = tuple(o["name"] for o in config["output"])

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        batch = [(pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy(),
                  tuple(r.requested_output_names())) for r in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(name, np.ascontiguousarray(value))
                                            for name, value in outputs.items()])
                for outputs in run_batch(self.session, self.input_name, self.output_names, batch)]
