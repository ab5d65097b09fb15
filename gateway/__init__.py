"""An asyncio gRPC gateway serving versioned ONNX models over the KServe V2 protocol."""

__version__ = "0.1.0"
