"""Bounded, unambiguous YAML for recipes and their overrides.

PyYAML's safe loader builds whatever a document describes: nine nested levels
of nine aliases (a 1.3 KB "billion laughs" file) compose in a blink as a
shared graph, and everything that later walks that graph (validation,
``repr`` in an error message, ``deepcopy``) runs for minutes and eats
gigabytes. This loader counts while it *composes*:

* every node adds one, every alias adds the expanded size of the node it
  names, so the running total is the size of the document as plain data and
  the load stops the moment it passes :data:`MAX_NODES`;
* nesting deeper than :data:`MAX_DEPTH` stops the load (the composer recurses
  per level, so this also keeps a ``[[[[...`` file from a RecursionError);
* an alias to a node that is still open (``&a [*a]``) is refused: it would
  make a cyclic structure;
* a key given twice in one mapping is an error naming the key path and both
  lines (YAML says keys are unique; PyYAML silently keeps the last one).

Input is read as bytes, limited to :data:`MAX_BYTES`, and decoded here, so a
non-UTF-8 byte is one error naming the file and its offset.

It also reads ``1e-3`` as a float (YAML 1.2) rather than the string YAML 1.1
makes of it.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.events import AliasEvent, MappingStartEvent, ScalarEvent, SequenceStartEvent
from yaml.nodes import MappingNode, Node, ScalarNode

from peftkit.options import _short_repr
from peftkit.training import _text

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "YamlInputError", "decode_utf8", "load_yaml"]

#: Largest recipe file, in bytes. The shipped recipes are ~4 KB; 256 KiB still parses in well under a second.
MAX_BYTES = 256 * 1024
#: Most nested collections. A recipe needs 5 (``method.options.target_modules.attention`` list).
MAX_DEPTH = 32
#: Most nodes of a document once aliases are expanded. The shipped recipes have ~200.
MAX_NODES = 100_000


class YamlInputError(ValueError):
    """A document refused before or while parsing; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def decode_utf8(data: bytes, source: str) -> str:
    """``data`` as text, or one error naming ``source`` and the offset of the first byte that is not UTF-8.

    A leading byte-order mark is dropped.
    """
    try:
        return _text.decode_utf8(data)
    except _text.NotUtf8Error as exc:
        raise YamlInputError([f"{source} is not UTF-8 text: {exc}; write it as UTF-8"]) from None


def _original_bytes(text: str) -> bytes:
    """The bytes ``text`` came from: Python decodes command-line arguments that are not UTF-8 into lone
    surrogates (``surrogateescape``), which this turns back into the bytes :func:`decode_utf8` reports."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no byte decodes to: keep it, decode_utf8 will name its offset
        return text.encode("utf-8", "surrogatepass")


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _construct_problem(node: Node, exc: Exception) -> str:
    kind = node.tag.rsplit(":", 1)[-1]
    if not isinstance(node, ScalarNode):
        return f"line {_line(node)}: a {kind} cannot be built from this value ({type(exc).__name__}: {exc})"
    if kind == "int" and len(node.value) > 100:  # Python converts at most 4300 digits (sys.get_int_max_str_digits)
        return f"line {_line(node)}: an integer of {len(node.value)} digits is far past any usable value (at most 2**63 - 1)"
    return f"line {_line(node)}: {_short_repr(node.value)} is not a valid {kind} ({type(exc).__name__}: {exc})"


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, with the counting composer described in the module docstring."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._open: list[int] = []  # expanded size so far of each collection being composed
        self._total = 0
        self._anchor_sizes: dict[str, int] = {}
        self._keys: list[str] = []  # key path of the value being composed
        self._seen: dict[int, dict[tuple[str, str], int]] = {}  # per open mapping: (tag, key) -> line
        self.duplicates: list[str] = []

    def _grow(self, size: int, mark: yaml.Mark) -> None:
        self._total += size
        if self._open:
            self._open[-1] += size
        if self._total > MAX_NODES:
            raise YamlInputError(
                [
                    f"the document expands to more than {MAX_NODES} nodes (line {mark.line + 1}); "
                    "aliases (*name) of large anchors multiply the size: write the values out instead"
                ]
            )

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if isinstance(parent, MappingNode) and isinstance(index, ScalarNode):
            self._check_duplicate(parent, index)
        if self.check_event(AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)  # raises for an undefined alias
            if event.anchor not in self._anchor_sizes:
                raise YamlInputError(
                    [f"alias *{event.anchor} (line {event.start_mark.line + 1}) refers to its own enclosing node; recursive data is not allowed"]
                )
            self._grow(self._anchor_sizes[event.anchor], event.start_mark)
            return node
        event = self.peek_event()
        if len(self._open) >= MAX_DEPTH:
            raise YamlInputError([f"nesting deeper than {MAX_DEPTH} levels (line {event.start_mark.line + 1}); flatten the data"])
        self._grow(1, event.start_mark)
        self._open.append(1)
        pushed = isinstance(index, ScalarNode) and isinstance(parent, MappingNode)
        if pushed:
            self._keys.append(str(index.value))
        try:
            node = super().compose_node(parent, index)
        finally:
            size = self._open.pop()
            if pushed:
                self._keys.pop()
        if self._open:
            self._open[-1] += size - 1  # the 1 was counted by _grow already
        self._seen.pop(id(node), None)
        if isinstance(event, (ScalarEvent, SequenceStartEvent, MappingStartEvent)) and event.anchor is not None:
            self._anchor_sizes[event.anchor] = size
        return node

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (YamlInputError, yaml.YAMLError):
            raise
        except Exception as exc:  # PyYAML lets ValueError, KeyError, ... out for a tagged or dated value it cannot build
            raise YamlInputError([_construct_problem(node, exc)]) from None

    def _check_duplicate(self, mapping: MappingNode, key: ScalarNode) -> None:
        seen = self._seen.setdefault(id(mapping), {})
        ident = (key.tag, key.value)
        if ident not in seen:
            seen[ident] = _line(key)
            return
        path = ".".join([*self._keys, str(key.value)])
        self.duplicates.append(f"duplicate key {path} at lines {seen[ident]} and {_line(key)}: YAML keys are unique; keep one of them")


_BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(data: bytes | str, source: str) -> Any:
    """Parse one YAML document within the bounds above.

    :param data: the document; bytes are decoded as UTF-8 by :func:`decode_utf8` (text is checked the same way).
    :param source: how to name the document in errors (a file name, or ``override 'k=v'``).
    :raises YamlInputError: too large, not UTF-8, too deep, too many nodes, recursive or duplicate keys.
    :raises yaml.YAMLError: not valid YAML.
    """
    if isinstance(data, str):
        data = _original_bytes(data)
    if len(data) > MAX_BYTES:
        raise YamlInputError([f"{source} is larger than {MAX_BYTES // 1024} KiB, the limit for a recipe; shorten it"])
    loader = _BoundedLoader(decode_utf8(data, source))
    try:
        value = loader.get_single_data()
    except (YamlInputError, yaml.YAMLError):
        raise
    except Exception as exc:  # the scanner lets a few out too, e.g. ValueError for "\U0011ffff"
        raise YamlInputError([f"line {loader.get_mark().line + 1}: not valid YAML ({type(exc).__name__}: {exc})"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise YamlInputError(loader.duplicates)
    return value
