"""Send a job's output to its log file while keeping its final error on the console,
so a failed pipeline job says what went wrong without opening the log."""

from __future__ import annotations

import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def logged_job(log_path: str | Path) -> Iterator[None]:
    """Redirect stdout/stderr to ``log_path``; on failure write the traceback there
    and the one-line reason to the real stderr, then re-raise."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    real_stdout, real_stderr = sys.stdout, sys.stderr
    with open(log_path, "w", buffering=1, encoding="utf-8") as log:
        sys.stdout = sys.stderr = log
        try:
            yield
        except BaseException as exc:
            traceback.print_exc(file=log)
            print(f"tga error: {type(exc).__name__}: {exc}", file=real_stderr, flush=True)
            raise
        finally:
            sys.stdout, sys.stderr = real_stdout, real_stderr
