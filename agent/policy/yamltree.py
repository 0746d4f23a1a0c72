"""YAML parsed into plain values that remember their line: what validation messages point at.

PyYAML's composer gives nodes with marks; each scalar is then built by SafeLoader's own
constructor, so `yes`, `0x10`, `1e3` and timestamps mean what they mean in any other YAML tool.
Duplicate keys are refused here (PyYAML keeps the last one silently, which hides typos).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml


class YamlError(ValueError):
    """The text is not YAML, or not YAML this loader accepts: `line` is 1-based."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


@dataclass(frozen=True, slots=True)
class YScalar:
    value: Any  # str, int, float, bool, None, or what SafeLoader makes of a scalar (dates)
    line: int


@dataclass(frozen=True, slots=True)
class YSeq:
    items: tuple[YNode, ...]
    line: int


@dataclass(frozen=True, slots=True)
class YMap:
    # Keys are the scalar keys as text; `key_lines` says where each key is written.
    items: dict[str, YNode] = field(hash=False)
    key_lines: dict[str, int] = field(hash=False)
    line: int


YNode = YScalar | YSeq | YMap


def parse(text: str) -> YNode | None:
    """The document in `text` as a located tree; None for an empty document."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = e.problem or e.context or "invalid YAML"
        raise YamlError(line, f"not valid YAML: {problem}") from None
    except yaml.YAMLError as e:  # no mark: e.g. a reader error on control characters
        raise YamlError(1, f"not valid YAML: {e}") from None
    if root is None:
        return None
    # One constructor for every scalar: building it is the costly part of a loader.
    constructor = yaml.SafeLoader("")
    return _convert(root, constructor, [0], 0)


# Aliases can make a tree refer to itself or expand exponentially ("billion laughs"): a policy
# is small, so anything past these bounds is refused instead of exhausting memory or the stack.
MAX_DEPTH = 32
MAX_NODES = 100_000


def _convert(node: yaml.Node, constructor: yaml.SafeLoader, count: list[int], depth: int) -> YNode:
    line = node.start_mark.line + 1
    count[0] += 1
    if depth > MAX_DEPTH or count[0] > MAX_NODES:
        raise YamlError(line, "the document is nested too deeply or too large for a policy")
    if isinstance(node, yaml.ScalarNode):
        try:
            value = constructor.construct_object(node, deep=True)
        except yaml.YAMLError as e:  # e.g. an impossible date like 2024-13-45
            raise YamlError(line, f"not a valid scalar: {node.value!r} ({e})") from None
        return YScalar(value, line)
    if isinstance(node, yaml.SequenceNode):
        return YSeq(
            tuple(_convert(item, constructor, count, depth + 1) for item in node.value), line
        )
    if isinstance(node, yaml.MappingNode):
        items: dict[str, YNode] = {}
        key_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlError(key_line, "mapping keys must be plain scalars")
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlError(key_line, "merge keys (<<) are not supported in a policy")
            key = str(key_node.value)
            if key in items:
                raise YamlError(key_line, f"duplicate key {key!r} (first on line {key_lines[key]})")
            items[key] = _convert(value_node, constructor, count, depth + 1)
            key_lines[key] = key_line
        return YMap(items, key_lines, line)
    raise YamlError(line, f"unsupported YAML node {type(node).__name__}")
