"""Prompt sources for configs: a list of strings from a text file (one prompt per line)."""

from __future__ import annotations

from pathlib import Path


def from_file(path: str | Path, limit: int | None = None) -> list[str]:
    """Non-empty, stripped lines of ``path`` (e.g. the HPDv2 or GenEval prompt lists), at most ``limit``."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit (how many prompts to keep) must be a whole number >= 1 or null, got {limit!r}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"prompt file '{path}' is a directory: give a text file with one prompt per line")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file '{path}' not found: give a text file with one prompt per line "
                                f"(prompts.train.path=... / prompts.eval.path=...)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file '{path}' is not UTF-8 text ({e.reason} at byte {e.start}): give a text file "
                         f"with one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file '{path}' holds no prompts")
    return prompts[:limit] if limit is not None else prompts
