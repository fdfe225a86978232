"""GGUF tensor types and the tool that makes each: gguf-py writes f32, f16, q8_0 and q4_0 itself;
the K-quants come from llama.cpp's own quantiser (llama-cpp-python) run over an f32 GGUF llmos wrote."""

from __future__ import annotations

import ctypes
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from llmos_cli.errors import UserError


@dataclass(frozen=True)
class GgufType:
    written: str  # the type the GGUF writer stores 2-D weights in
    llama_ftype: str | None = None  # llama.cpp's LLAMA_FTYPE_* the written file is quantised to
    package: str = "gguf"  # the pip package that makes it

    @property
    def module(self) -> str:
        return "llama_cpp" if self.package == "llama-cpp-python" else "gguf"


GGUF_TYPES: dict[str, GgufType] = {
    "f32": GgufType("f32"),
    "f16": GgufType("f16"),
    "q8_0": GgufType("q8_0"),
    "q4_0": GgufType("q4_0"),
    "q4_k_m": GgufType("f32", "LLAMA_FTYPE_MOSTLY_Q4_K_M", "llama-cpp-python"),
    "q5_k_m": GgufType("f32", "LLAMA_FTYPE_MOSTLY_Q5_K_M", "llama-cpp-python"),
    "q6_k": GgufType("f32", "LLAMA_FTYPE_MOSTLY_Q6_K", "llama-cpp-python"),
}
GGUF_DTYPES = tuple(GGUF_TYPES)


def gguf_type(name: str) -> GgufType:
    """The GGUF type `name`, refused (exit 2) when unknown or when the package that makes it is missing."""
    kind = GGUF_TYPES.get(name)
    if kind is None:
        raise UserError(f"--gguf-dtype must be one of {', '.join(GGUF_DTYPES)}, not '{name}'")
    if importlib.util.find_spec(kind.module) is None:
        raise UserError(
            f"--gguf-dtype {name} needs the {kind.package} package, which is not installed",
            hint=f"pip install {kind.package}",
        )
    return kind


def llama_cpp_quantize(src: Path, dest: Path, ftype: str) -> Path:
    """Quantise the GGUF `src` to `dest` with llama.cpp's quantiser (llama_model_quantize)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = min(4, os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not quantise {src} to {ftype} (return code {rc})")
    return dest
