"""The bare grpc.aio floor: a server that answers ModelInfer with a fixed, pre-serialised reply.

It decodes nothing and runs no model, so its throughput is the most any Python grpc.aio server
can reach on this machine; the gateway is measured as a ratio of it.

``--protocol http`` is the REST floor: a bare aiohttp server (the gateway's HTTP server library,
on uvloop) that reads each POST's body and answers a fixed KServe V2 REST reply, binary tensor
data when the request came with ``Inference-Header-Content-Length`` and plain JSON otherwise.

    python -m bench.floor --port 9001
    python -m bench.floor --protocol http --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import json

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


HEADER_LENGTH = "Inference-Header-Content-Length"


def fixed_http_replies(outputs: int = 4) -> tuple[bytes, bytes, int]:
    """The REST floor's replies for the same output as ``fixed_reply``: (JSON body, binary body,
    the binary body's JSON length)."""
    out = np.zeros((1, outputs), dtype=np.float32)
    doc = {"model_name": "floor", "model_version": "1",
           "outputs": [{"name": "output", "datatype": "FP32", "shape": list(out.shape)}]}
    doc["outputs"][0]["data"] = out.ravel().tolist()
    plain = json.dumps(doc, separators=(",", ":")).encode()
    del doc["outputs"][0]["data"]
    doc["outputs"][0]["parameters"] = {"binary_data_size": out.nbytes}
    head = json.dumps(doc, separators=(",", ":")).encode()
    return plain, head + out.tobytes(), len(head)


async def serve_http(host: str, port: int) -> None:
    from aiohttp import web

    plain, binary, json_length = fixed_http_replies()
    binary_headers = {HEADER_LENGTH: str(json_length)}

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        if HEADER_LENGTH in request.headers:
            return web.Response(body=binary, headers=binary_headers,
                                content_type="application/octet-stream")
        return web.Response(body=plain, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", infer)
    app.router.add_post("/v2/models/{model}/versions/{version}/infer", infer)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    print(f"floor ready: http {host}:{runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    server = serve_http(args.host, args.port) if args.protocol == "http" else \
        serve(args.host, args.port)
    if args.no_uvloop:
        asyncio.run(server)
    else:
        import uvloop

        uvloop.run(server)


if __name__ == "__main__":
    main()
