"""Reading the YAML files a user writes for the card (SA files, card profiles), with one-line errors.

PyYAML is the one import beyond the standard library in device/contract, and only when a file is read:
the host and the guest image both have it, and the package stays importable without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_yaml(path: str | Path, what: str, error: type[Exception]) -> Any:
    """The document in ``path``; ``error("<path>: ...")`` when the file cannot be read or is not YAML."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        return yaml.safe_load(text)
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise error(f"{path}: YAML nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
