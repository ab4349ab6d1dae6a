"""Echo, decoupled: one response per request, its latency observed in the first-audio histogram."""
import json
import time

import triton_python_backend_utils as pb_utils

from vocos_triton.serving.metrics import FIRST_AUDIO, LatencyHistogram


class TritonPythonModel:
    def initialize(self, args):
        name = json.loads(args["model_config"])["name"]
        self.first_audio = LatencyHistogram(pb_utils, FIRST_AUDIO, "Seconds to a stream's first audio", name,
                                            args["model_instance_name"])

    def execute(self, requests):
        for request in requests:
            began = time.monotonic()
            sender = request.get_response_sender()
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            time.sleep(0.03)  # a first piece 30 ms in: lands in the (0.025, 0.05] bucket
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("y", x)]))
            self.first_audio.observe(time.monotonic() - began)
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
