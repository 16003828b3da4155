"""`rlhf serve-rm`: a reward checkpoint behind MLServer, over the Open Inference Protocol (REST and gRPC).

Why MLServer rather than KServe's Python ModelServer: MLServer batches requests itself (adaptive batching:
`max_batch_size`, `max_batch_time`), while KServe leaves batching to a sidecar of its Kubernetes deployment;
and MLServer is what KServe itself runs for its v2 runtimes, so the same server works inside KServe.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from mlserver import MLModel, MLServer
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.errors import MLServerError
from mlserver.settings import ModelParameters, ModelSettings, Settings
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

from . import BadRequest, RewardScorer

_LOADED: dict[str, RewardScorer] = {}  # scorers `serve` loaded before the server started, by checkpoint path


class RewardRuntime(MLModel):
    """The MLServer runtime: decodes the request's tensors, scores them, answers `rewards` (FP32, [N])."""

    async def load(self) -> bool:
        uri = self.settings.parameters.uri
        self.scorer = _LOADED.get(uri) or RewardScorer(uri)
        self.output = (self.settings.parameters.extra or {}).get("output", "rewards")
        self.pool = ThreadPoolExecutor(1)  # one forward at a time, off the event loop: health checks stay answered
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        try:
            inputs = {i.name: (StringCodec if i.datatype == "BYTES" else NumpyCodec).decode_input(i)
                      for i in payload.inputs}
            scores = await asyncio.get_running_loop().run_in_executor(self.pool, self.scorer, inputs)
        except (BadRequest, ValueError, TypeError) as e:  # decode errors (a shape its data does not fill) too
            raise MLServerError(f"bad inference request: {e}", 400) from None
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=[ResponseOutput(
            name=self.output, shape=[len(scores)], datatype="FP32", data=scores.tolist())])


def serve(scorer: RewardScorer, ckpt: str, port: int = 8080, grpc_port: int | None = None, model_name: str = "reward",
          max_batch_size: int = 64, max_batch_time: float = 0.005, host: str = "0.0.0.0", output: str = "rewards",
          on_ready=None) -> None:
    """Serve `scorer` (serving.prepare: the checkpoint loaded and the ports checked before MLServer is even
    imported) until stopped (SIGINT / SIGTERM)."""
    grpc_port = grpc_port if grpc_port is not None else port + 1
    _LOADED[ckpt] = scorer
    settings = Settings(http_port=port, grpc_port=grpc_port, host=host, metrics_endpoint=None, parallel_workers=0,
                        debug=False, load_models_at_startup=False)
    model = ModelSettings(name=model_name, implementation=RewardRuntime, max_batch_size=max_batch_size,
                          max_batch_time=max_batch_time if max_batch_size > 1 else 0.0,
                          parameters=ModelParameters(uri=ckpt, extra={"output": output}))

    async def run():  # MLServer puts its signal handlers on the running loop: build it inside
        server = MLServer(settings)
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # no line per request
        if on_ready:
            on_ready()
        await server.start([model])
    asyncio.run(run())
