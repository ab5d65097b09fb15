"""Model runtimes behind one small interface (see ``runtimes.base``)."""

from runtimes.base import ModelIO, Runtime, RuntimeOptions

__all__ = ["ModelIO", "Runtime", "RuntimeOptions", "load_runtime"]


def load_runtime(path, options: RuntimeOptions) -> Runtime:
    """Open the model file at ``path`` with the runtime that serves its format."""
    from runtimes.ort import OrtRuntime

    return OrtRuntime(path, options)
