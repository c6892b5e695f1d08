"""Reading YAML strictly: UTF-8 text only, and no key given twice in one mapping.

PyYAML's ``safe_load`` keeps the last of two equal keys without a word (``epochs: 2`` ...
``epochs: 5`` trains 5 epochs), so every YAML the project reads (configs, overrides, run
folders' ``config.yaml``, ``--model-args``) goes through :func:`load_yaml`, whose loader
refuses a repeated key and names it with both lines. Merge keys (``<<: *base``) still
override what they merge, as YAML defines. :func:`read_yaml_file` adds the file checks: a
binary or non-UTF-8 file is one clear error naming the file, not a codec traceback.

Every error is a :class:`YAMLInputError` (a ``ValueError``) whose message is one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DuplicateKeyError", "UniqueKeyLoader", "YAMLInputError", "load_yaml", "read_yaml_file"]


class YAMLInputError(ValueError):
    """A YAML text or file cannot be read as the project's YAML; the message is one line."""


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping gives the same key twice (``key``, and the 1-based ``lines`` of both)."""

    def __init__(self, key: Any, lines: tuple[int, int]) -> None:
        where = (
            f"on line {lines[0]}" if lines[0] == lines[1] else f"lines {lines[0]} and {lines[1]}"
        )
        super().__init__(None, None, f"key {key!r} is given twice ({where})")
        self.key, self.lines = key, lines


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises :class:`DuplicateKeyError` on a repeated mapping key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<`: merged keys may be overridden, that is what a merge is for
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise DuplicateKeyError(key, (first_line[key], line))
                first_line[key] = line
            except TypeError:
                continue  # an unhashable key: the base class reports it
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str = "<string>") -> Any:
    """Parse ``text`` like ``yaml.safe_load``, refusing repeated keys.

    Raises :class:`YAMLInputError` ``"<source>: <problem> (line L, column C)"``.
    """
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise YAMLInputError(f"{source}: {describe_yaml_error(err)}") from None


def describe_yaml_error(err: yaml.YAMLError) -> str:
    """One line for a PyYAML error: the problem and where (PyYAML's own text spans lines)."""
    if isinstance(err, DuplicateKeyError):
        return f"{err.problem}; keep one"
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    context = getattr(err, "context", None)
    return f"not valid YAML: {problem}{where}" + (f", {context}" if context else "")


def read_yaml_file(path: str | os.PathLike) -> Any:
    """The YAML document in ``path`` (``None`` for an empty or comment-only file).

    Raises ``FileNotFoundError`` when there is no such file, :class:`YAMLInputError` (naming
    the file) when it is binary, not UTF-8, not valid YAML or repeats a key, and ``OSError``
    when it cannot be read.
    """
    path = Path(path)
    data = path.read_bytes()
    if b"\0" in data:
        raise YAMLInputError(f"{path} is a binary file (it holds NUL bytes), not YAML text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise YAMLInputError(
            f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
            "save it as UTF-8"
        ) from None
    return load_yaml(text.removeprefix("\ufeff"), str(path))
