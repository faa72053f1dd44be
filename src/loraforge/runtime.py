"""Process-wide settings, in one place: every side effect on the environment happens here.

The entry points (the CLI, the server, the demo, the benchmarks) call :func:`configure_process`
once at start-up. No other module sets an environment variable, edits ``PATH`` or changes a
library's logging; library functions (``train``, ``load_model``) still work without it, since
every model file is read with ``local_files_only``.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings

_configured = {"done": False}


def configure_process(*, quiet: bool = True) -> None:
    """Offline Hugging Face libraries, quiet logs, and ``ninja`` on ``PATH`` for the native kernels.

    Args:
        quiet: lower transformers' logging to errors and hide its progress bars (the CLI shows
            its own), and log loraforge's own messages as plain lines.
    """
    # Nothing may be fetched from a model hub: models are local files, and a missing one must say so.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    put_ninja_on_path()
    if quiet:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        if not _configured["done"]:
            logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.getLogger("alembic").setLevel(logging.WARNING)  # its migration chatter on every start
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    _configured["done"] = True


def put_ninja_on_path() -> None:
    """PyTorch builds the native kernels with ``ninja`` from PATH: the ``ninja`` package's, when none is there."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja  # type: ignore[import-untyped]
    except ImportError:
        return
    os.environ["PATH"] = str(ninja.BIN_DIR) + os.pathsep + os.environ.get("PATH", "")
