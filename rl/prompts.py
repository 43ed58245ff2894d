"""Prompt sources for configs: a list of strings from a text file (one prompt per line)."""

from __future__ import annotations

from pathlib import Path


def from_file(path: str | Path, limit: int | None = None) -> list[str]:
    """Non-empty, stripped lines of ``path`` (e.g. the HPDv2 or GenEval prompt lists), at most ``limit``."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit (how many prompts to keep) must be a whole number >= 1 or null, got {limit!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file '{path}' not found: give a text file with one prompt per line "
                                f"(prompts.train.path=... / prompts.eval.path=...)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file '{path}' holds no prompts")
    return prompts[:limit] if limit is not None else prompts
