"""llmos: the command-line toolchain for training and shipping language models."""

__version__ = "0.1.0"

__all__ = ["LLMOS", "__version__"]


def __getattr__(name: str):
    # The API pulls in torch and transformers; keep `import llmos_cli` (and `llmos --version`) fast.
    if name == "LLMOS":
        from llmos_cli.api import LLMOS

        return LLMOS
    raise AttributeError(name)
