"""Shared pytest set-up: Triton's interpreter on machines without a GPU, one zebra cache per session, and the
embedded SmolLM2 teacher converted from its GGUF once in it. The markers are registered in pyproject.toml.

`import torch` imports Triton (where it is installed), and Triton reads TRITON_INTERPRET when its own helpers
(`tl.zeros`, ...) are defined, so the variable must be set before the first `import torch` of the session: here,
at the top of the first conftest. Without a GPU the project's Triton kernels can only run interpreted; on a GPU
machine they compile.
"""

import dataclasses
import os
import shutil
import time
from pathlib import Path

import pytest

if shutil.which("nvidia-smi") is None and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def zebra_cache(tmp_path_factory):
    """`$ZEBRA_CACHE` (converted teachers and their tokenizers, tokenised data) in a directory of this session's
    own, so a run sees what a clean machine sees and leaves the user's cache alone; processes the tests start
    inherit it. Removed at the end: a converted teacher alone is half a gigabyte."""
    path = tmp_path_factory.mktemp("zebra-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZEBRA_CACHE", str(path))
        yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass
class Conversion:
    gguf: Path
    seconds: float


@pytest.fixture(scope="session", autouse=True)
def gguf_conversions(zebra_cache):
    """Every GGUF conversion this process completes, timed, whichever test's load makes it (loading the default
    tokenizer converts the embedded teacher too): the tests check that it happens once per session."""
    from zebra.compose import teacher

    conversions = []
    convert = teacher.convert_gguf

    def timed(gguf_path, *args, **kwargs):
        start = time.perf_counter()
        convert(gguf_path, *args, **kwargs)
        conversions.append(Conversion(Path(gguf_path), time.perf_counter() - start))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(teacher, "convert_gguf", timed)
        yield conversions


@pytest.fixture(scope="session")
def smollm2_teacher(gguf_conversions):
    """The embedded SmolLM2-135M-Instruct teacher, loaded once per session from the session's cache."""
    from zebra.compose.teacher import load_teacher

    return load_teacher("smollm2_135m")
