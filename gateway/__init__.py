"""An asyncio gRPC gateway serving versioned ONNX models over the KServe V2 protocol.

``from gateway import publish`` is the training hook (see gateway/hooks.py): it checks an ONNX
file and publishes it as a model's next version, into a repository or through a gateway.
"""

__version__ = "0.1.0"
__all__ = ["publish"]


def __getattr__(name: str):
    # Lazy: ``import gateway`` (every CLI call) must not pull in numpy and onnxruntime.
    if name == "publish":
        from gateway.hooks import publish

        return publish
    raise AttributeError(f"module 'gateway' has no attribute {name!r}")
