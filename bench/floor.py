"""The bare grpc.aio floor: a server that answers ModelInfer with a fixed, pre-serialised reply.

It decodes nothing and runs no model, so its throughput is the most any Python grpc.aio server
can reach on this machine; the gateway is measured as a ratio of it.

    python -m bench.floor --port 9001
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import numpy as np

from gateway.protocol.pb import grpc_service_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def fixed_reply(outputs: int = 4) -> bytes:
    out = np.zeros((1, outputs), dtype=np.float32)
    return pb.ModelInferResponse(
        model_name="floor", model_version="1",
        outputs=[pb.ModelInferResponse.InferOutputTensor(name="output", datatype="FP32",
                                                         shape=out.shape)],
        raw_output_contents=[out.tobytes()]).SerializeToString()


async def serve(host: str, port: int, ready_file: str | None = None) -> None:
    reply = fixed_reply()

    async def model_infer(request: bytes, context) -> bytes:
        return reply

    handler = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer),
    })
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"floor ready: grpc {host}:{bound}", flush=True)
    await server.wait_for_termination()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    if args.no_uvloop:
        asyncio.run(serve(args.host, args.port))
    else:
        import uvloop

        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
