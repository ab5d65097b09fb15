"""Register a servicer's methods from the service descriptor, with a deserializer that never
raises: a message that does not parse is answered INVALID_ARGUMENT by the gateway instead of
UNKNOWN by grpc (the generated ``add_*_to_server`` helpers let the parse error escape)."""

from __future__ import annotations

import grpc
from google.protobuf import message, message_factory

INVALID = object()  # what the deserializer returns for bytes that are not the message


def _safe(parse):
    def deserialize(data: bytes):
        try:
            return parse(data)
        except message.DecodeError:
            return INVALID
    return deserialize


def _refuse_invalid(behavior, type_name: str):
    async def unary(request, context):
        if request is INVALID:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid {type_name} message")
        return await behavior(request, context)
    return unary


def _refuse_invalid_stream(behavior, type_name: str):
    async def streaming(request, context):
        if request is INVALID:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid {type_name} message")
        async for item in behavior(request, context):
            yield item
    return streaming


def add_servicer(server, servicer, service) -> None:
    """Register every method of ``service`` (a ServiceDescriptor) implemented by ``servicer``.

    Client-streaming methods receive ``INVALID`` items for unparsable messages and must handle
    them themselves.
    """
    handlers = {}
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        behavior = getattr(servicer, method.name)
        kwargs = {"request_deserializer": _safe(request_cls.FromString),
                  "response_serializer": response_cls.SerializeToString}
        name = method.input_type.full_name
        if method.client_streaming and method.server_streaming:
            handler = grpc.stream_stream_rpc_method_handler(behavior, **kwargs)
        elif method.client_streaming:
            handler = grpc.stream_unary_rpc_method_handler(behavior, **kwargs)
        elif method.server_streaming:
            handler = grpc.unary_stream_rpc_method_handler(
                _refuse_invalid_stream(behavior, name), **kwargs)
        else:
            handler = grpc.unary_unary_rpc_method_handler(_refuse_invalid(behavior, name),
                                                          **kwargs)
        handlers[method.name] = handler
    # Generic handlers only: the "registered method" path measured slower per call on grpcio
    # 1.81-1.85 aio (bench/RESULTS.md, edge overhead).
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name,
                                                                           handlers),))
