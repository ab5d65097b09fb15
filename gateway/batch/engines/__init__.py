"""Engines that run a batch scoring job's requests: a running gateway, or this process."""

from gateway.batch.engines.base import Engine, ModelInfo, RetryPolicy, call_with_retries

__all__ = ["Engine", "ModelInfo", "RetryPolicy", "call_with_retries", "make_engine"]


def make_engine(model: str, *, url: str | None = None, model_repository=None,
                model_version: str = "", timeout: float = 60.0, token: str | None = None,
                tls=None, cpu_threads: int = 1) -> Engine:
    """The remote engine for ``url``, or the in-process one for ``model_repository``."""
    from gateway.batch.errors import UsageError

    if url is not None and model_repository is not None:
        raise UsageError("give --url (a running gateway) or --model-repository (the model in "
                         "this process), not both")
    if url is None and model_repository is None:
        raise UsageError("give --url HOST:PORT to score through a running gateway, or "
                         "--model-repository DIR (or a model .onnx file) to score in this "
                         "process")
    if url is not None:
        from gateway.batch.engines.remote import RemoteEngine

        return RemoteEngine(url, model, model_version, timeout=timeout, token=token, tls=tls)
    from gateway.batch.engines.local import LocalEngine

    return LocalEngine(model_repository, model, model_version, cpu_threads=cpu_threads)
