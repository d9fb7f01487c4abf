"""Dataclass configs loaded from YAML, overridable from the command line.

A config is a (possibly nested) ``@dataclass``; YAML supplies values for its fields and
``key=value`` CLI overrides are applied on top::

    @dataclass
    class OptimConfig:
        lr: float = 3e-4
        betas: tuple[float, float] = (0.9, 0.95)

    @dataclass
    class TrainConfig:
        name: str = "run"
        max_steps: int = 1000
        optim: OptimConfig = field(default_factory=OptimConfig)

    cfg = load_config(TrainConfig, "configs/train/base.yaml", ["optim.lr=1e-4", "max_steps=20"])

Rules:

* **Includes.** A file may name parent files with a top-level ``base: other.yaml`` or
  ``defaults: [a.yaml, b.yaml]`` (both keys are accepted; each takes a string or a list).
  Paths are relative to the including file. Parents are merged in the order listed, then the
  file's own keys on top; mappings merge key by key, any other value (lists included) is
  replaced wholesale. Includes may nest; cycles are an error.
* **Overrides.** ``a.b.c=value``; the value is parsed with ``yaml.safe_load`` so ``3``,
  ``0.1``, ``true``, ``null``, ``[1, 2]`` and ``{x: 1}`` work. Overrides are applied after all
  files, in order. For a ``str`` field the override text is kept verbatim (``name=007`` gives
  ``"007"``, not ``7``; ``prompt={question}`` gives the text, not a mapping).
* **Types.** Values are checked against the field annotations and coerced where lossless:
  ``int``, ``float`` (also from YAML strings such as ``3e-4``, which YAML 1.1 does not read as a
  number), ``bool`` (real booleans only), ``str``, ``pathlib.Path``, ``Optional``/unions,
  ``Literal``, ``list[T]``, ``tuple[T, ...]``/``tuple[A, B]``, ``dict[K, V]``, nested
  dataclasses and ``Any``.
* **Errors** are :class:`ConfigError` and name the dotted key: unknown keys (with a
  did-you-mean suggestion and the list of valid keys), type mismatches (expected type and the
  value received), missing required keys and missing files (with their path).
* **Documentation.** A field is documented by an attribute docstring, a string literal on
  the line(s) right after it (as in torchtitan)::

      lr: float = 3e-4
      \"\"\"Peak learning rate.\"\"\"

  Python drops these at runtime, so :func:`config_keys` reads them from the source with
  ``ast``; it walks the dataclass tree and yields each dotted key with its type, default and
  docstring, and :func:`format_config_help` lays that out for a ``--help`` screen.
* **Building blocks.** A loader with its own layout (``llama_vision.curation``: a list of
  stage sections) uses the same two steps as :func:`load_config`:
  :func:`apply_override` applies one ``a.b=value`` to a raw mapping read with
  :func:`load_yaml`, and :func:`build_dataclass` turns a mapping into a dataclass with the
  checks and coercions above, naming keys under a dotted ``prefix``.
"""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import difflib
import functools
import inspect
import shutil
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence, TypeVar, Union

import yaml

from llama_vision.utils.io import atomic_write_text

__all__ = [
    "ConfigError",
    "ConfigKey",
    "apply_override",
    "build_dataclass",
    "class_doc",
    "config_keys",
    "config_to_dict",
    "field_docs",
    "format_config_help",
    "format_type",
    "format_value",
    "load_config",
    "load_yaml",
    "parse_cli",
    "save_config",
]

T = TypeVar("T")

#: Top-level keys that name parent config files (see module docstring).
INCLUDE_KEYS = ("base", "defaults")


class ConfigError(ValueError):
    """Invalid config: unknown key, wrong type, missing key/file or malformed override."""


@dataclasses.dataclass(frozen=True)
class _Override:
    """A CLI override value: the YAML-parsed value plus the original text (for ``str`` fields)."""

    text: str
    parsed: Any


class _OverrideMapping(dict):
    """A CLI override that YAML reads as a mapping, with its original text: still a mapping
    for later ``a.b=...`` overrides to merge into, and the text for a ``str`` field
    (``prompt={question}`` is the template "{question}", not ``{"question": None}``)."""

    def __init__(self, parsed: dict, text: str):
        super().__init__(parsed)
        self.text = text


# --------------------------------------------------------------------------- YAML loading


def load_yaml(path: str | Path, _stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config file, resolving ``base``/``defaults`` includes, into a plain dict."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, resolved))
        raise ConfigError(f"config include cycle: {chain}")
    if not path.is_file():
        where = f" (included from {_stack[-1]})" if _stack else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse YAML config {path}: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping at top level, got {type(data).__name__}")

    merged: dict[str, Any] = {}
    for key in INCLUDE_KEYS:
        parents = data.pop(key, None)
        if parents is None:
            continue
        if isinstance(parents, str):
            parents = [parents]
        if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
            raise ConfigError(f"'{key}' in {path} must be a file name or a list of file names, got {parents!r}")
        for parent in parents:
            merged = _deep_merge(merged, load_yaml(path.parent / parent, (*_stack, resolved)))
    return _deep_merge(merged, data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated with ``top``; nested mappings merge, everything else is replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override to the raw mapping ``data`` in place (the
    rules of the module docstring: YAML-parsed value, ``str`` fields keep the text, a
    mapping value merges into a mapping); ConfigError if ``item`` is malformed."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")) or " " in key:
        raise ConfigError(f"malformed override {item!r}: expected key=value, e.g. optim.lr=3e-4")
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value of override {item!r}: {e}") from e
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if isinstance(parsed, dict) and isinstance(node.get(leaf), dict):
        # `optim={lr: 1}` updates the section like a YAML include would, not replacing it.
        node[leaf] = _deep_merge(node[leaf], parsed)
    else:
        node[leaf] = _OverrideMapping(parsed, text=text) if isinstance(parsed, dict) else _Override(text, parsed)


# --------------------------------------------------------------------------- dict -> dataclass


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build dataclass ``cls`` from YAML file ``path`` (optional) plus ``key=value`` overrides."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config expects a dataclass type, got {cls!r}")
    data = load_yaml(path) if path is not None else {}
    for item in overrides:
        apply_override(data, item)
    return build_dataclass(cls, data, prefix="")


def build_dataclass(cls: type[T], data: Any, prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from mapping ``data`` (raw YAML, overrides applied),
    type-checked and coerced as the module docstring says; ``prefix`` is the dotted key of
    ``data`` itself (``"stages[2]."``), so errors name the full key. Raises ConfigError."""
    if isinstance(data, _Override):
        data = data.parsed
    if not isinstance(data, dict):
        raise ConfigError(
            f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping for {cls.__name__}, "
            f"got {data!r} ({type(data).__name__})"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            _raise_unknown(str(key), list(fields), prefix)

    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required config key '{key}'")
            continue
        value = data[name]
        tp = hints.get(name, Any)
        # A partial mapping for a nested dataclass field merges onto the field's own default
        # (which may differ from the nested class's defaults), not onto a blank instance.
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            default = _field_default(f)
            if dataclasses.is_dataclass(default):
                value = _deep_merge(config_to_dict(default), value)
        kwargs[name] = _coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"invalid config section '{prefix.rstrip('.') or cls.__name__}': {e}") from e


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _raise_unknown(key: str, valid: list[str], prefix: str) -> None:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    listing = ", ".join(prefix + v for v in valid) or "(none)"
    raise ConfigError(f"unknown config key '{prefix}{key}'{hint} Valid keys: {listing}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is None and hasattr(tp, "__name__"):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("pathlib.", "")


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it where that is lossless."""
    if tp is Any or tp is object:
        return value.parsed if isinstance(value, _Override) else value
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if origin is Union or origin is types.UnionType:
        raw = value.parsed if isinstance(value, _Override) else value
        if raw is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise _type_error(key, tp, raw)

    if tp is str:
        if isinstance(value, _Override):
            # Keep the user's text for strings: `name=007` means "007", not the int 7.
            return value.parsed if isinstance(value.parsed, str) else value.text
        if isinstance(value, _OverrideMapping):
            return value.text
        if isinstance(value, str):
            return value
        raise _type_error(key, tp, value)

    if isinstance(value, _Override):
        value = value.parsed

    if origin is Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return allowed
        raise ConfigError(f"config key '{key}': expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
            try:
                as_float = float(value)  # "1e5" (a string to YAML 1.1) is a fine step count
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
        raise _type_error(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "3e-4" as a string
            except ValueError:
                pass
        raise _type_error(key, tp, value)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _type_error(key, tp, value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        return build_dataclass(tp, value, prefix=key + ".")

    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}': expected {len(args)} items ({_type_name(tp)}), got {value!r}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            elem = args[0] if args else Any
            items = [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items

    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(key, tp, value)
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}

    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _type_error(key, tp, value)
    raise ConfigError(f"config key '{key}': unsupported field type {tp!r}")


# --------------------------------------------------------------------------- dataclass -> YAML


def config_to_dict(cfg: Any) -> Any:
    """Convert a (nested) config dataclass into plain YAML-safe Python data.

    Tuples become lists and paths become strings, so ``yaml.safe_dump`` accepts the result and
    :func:`load_config` turns it back into an equal config.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML to ``path`` atomically (field order preserved)."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------- documentation


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One entry of :func:`config_keys`.

    key: the dotted key as written in YAML paths and overrides (``optim.lr``).
    section: the dotted key of the enclosing section (``"optim"``; ``""`` at top level).
    type: the annotation, readable (``float``, ``list[str]``, ``Optional[int]``).
    default: the default value (``dataclasses.MISSING`` for a required key); keys inside a
        section take their default from the section field's default instance, as
        :func:`load_config` does.
    doc: the field's attribute docstring, cleaned (``""`` when it has none).
    annotation: the resolved annotation (the string itself where it cannot be resolved).
    is_section: the field is a nested dataclass (only yielded with ``sections=True``).
    """

    key: str
    section: str
    type: str
    default: Any
    doc: str
    annotation: Any = None
    is_section: bool = False

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    @property
    def default_text(self) -> str:
        """The default as you would write it in YAML or a ``key=value`` override."""
        return format_value(self.default)


def config_keys(cls: type, *, sections: bool = False) -> Iterator[ConfigKey]:
    """Walk dataclass ``cls`` depth-first in field order and yield a :class:`ConfigKey` per
    key: every leaf field, and with ``sections=True`` also each nested-dataclass field (just
    before its own keys). Works for any dataclass tree; docstrings come from
    :func:`field_docs`."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"config_keys expects a dataclass type, got {cls!r}")
    yield from _walk(cls, "", dataclasses.MISSING, sections)


def _walk(cls: type, prefix: str, instance: Any, sections: bool) -> Iterator[ConfigKey]:
    hints = _type_hints(cls)
    docs = field_docs(cls)
    section = prefix.rstrip(".")
    for f in dataclasses.fields(cls):
        if not f.init:
            continue  # not settable from a config
        if instance is not dataclasses.MISSING:
            default = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        tp = hints.get(f.name, f.type)
        sub = _section_class(tp, default)
        key = prefix + f.name
        if sub is None:
            yield ConfigKey(key, section, format_type(tp), default, docs.get(f.name, ""), tp)
            continue
        if sections:
            yield ConfigKey(key, section, format_type(sub), default, docs.get(f.name, ""), sub, is_section=True)
        yield from _walk(sub, key + ".", default if isinstance(default, sub) else dataclasses.MISSING, sections)


def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations; where that fails (a class defined inside a function, with
    ``from __future__ import annotations``), the fields' own (string) annotations."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 -- NameError, TypeError, ... from unresolvable strings
        return {}


def _section_class(tp: Any, default: Any) -> type | None:
    """The dataclass a field nests (its keys get a dotted prefix), else None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if isinstance(tp, str) and dataclasses.is_dataclass(default) and not isinstance(default, type):
        return type(default)  # unresolved annotation: the default instance tells
    return None


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: attribute docstring}`` of dataclass ``cls`` (and its bases), read from
    the source with ``ast``; fields without one are absent. Empty when the source is not
    available (a class defined in an interactive session)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object:
            docs.update(_class_source_docs(klass)[1])
    return docs


def class_doc(cls: type) -> str:
    """The class's own docstring as written (not dataclasses' generated signature)."""
    return _class_source_docs(cls)[0]


@functools.lru_cache(maxsize=None)
def _class_source_docs(cls: type) -> tuple[str, dict[str, str]]:
    """(class docstring, {field: attribute docstring}) from ``cls``'s own source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return "", {}
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if node is None:
        return "", {}
    docs: dict[str, str] = {}
    for stmt, nxt in zip(node.body, node.body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return ast.get_docstring(node) or "", docs


def format_type(tp: Any) -> str:
    """A readable annotation: ``float``, ``list[str]``, ``Optional[int]``,
    ``Literal['fp32', 'bf16']``, ``dict[str, Any]``, ``tuple[int, ...]``, ``Path``."""
    if isinstance(tp, str):
        return tp
    if tp is type(None) or tp is None:
        return "None"
    if tp is Any:
        return "Any"
    if tp is Ellipsis:
        return "..."
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is Union or origin is types.UnionType:
        rest = [a for a in args if a is not type(None)]
        inner = " | ".join(format_type(a) for a in rest)
        return f"Optional[{inner}]" if len(rest) < len(args) else inner
    if origin is not None:
        name = getattr(origin, "__name__", None) or str(origin).replace("typing.", "")
        return f"{name}[{', '.join(format_type(a) for a in args)}]" if args else name
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def format_value(value: Any) -> str:
    """A default as YAML flow text, what a ``key=value`` override takes (``null``,
    ``true``, ``[0.9, 0.95]``, ``{}``); ``(required)`` for ``dataclasses.MISSING``."""
    if value is dataclasses.MISSING:
        return "(required)"
    try:
        text = yaml.safe_dump(config_to_dict(value), default_flow_style=True, width=1 << 30)
    except yaml.YAMLError:
        return repr(value)
    text = text.strip()
    return text[: -len("...")].rstrip() if text.endswith("\n...") else text


def format_config_help(cls: type, *, width: int | None = None) -> str:
    """Every key of dataclass ``cls`` with its type, default and docstring, grouped by
    section (top level first), for a ``--help`` screen::

        optim.*  AdamW and its schedule ...
          optim.lr                  float = 0.0001
                                    Peak learning rate, ...

    ``width``: wrap docstrings to this many columns (default: the terminal's, 80 to 120).
    """
    if width is None:
        width = min(max(shutil.get_terminal_size((100, 24)).columns, 80), 120)
    entries = list(config_keys(cls, sections=True))
    leaves = [e for e in entries if not e.is_section]
    column = min(max((len(e.key) for e in leaves), default=0), 30) + 4
    width = max(width, column + 30)

    groups: dict[str, list[ConfigKey]] = {"": []}
    for e in leaves:
        groups.setdefault(e.section, []).append(e)
    section_entry = {e.key: e for e in entries if e.is_section}

    lines = [
        "Config keys: set them in the --config YAML file or as key=value (defaults shown as YAML).",
    ]
    for section, keys in groups.items():
        if not keys:
            continue
        lines.append("")
        if section:
            entry = section_entry[section]
            about = class_doc(entry.annotation) or entry.doc
            head = f"{section}.*"
        else:
            about, head = "", "top level"
        about = " ".join(about.split())
        if about:
            lines.extend(textwrap.wrap(f"{head}  {about}", width, subsequent_indent=" " * (len(head) + 2),
                                       break_on_hyphens=False))
        else:
            lines.append(head)
        for e in keys:
            lines.append(f"  {e.key:<{column - 4}}  {e.type} = {e.default_text}")
            for para in (e.doc or "(undocumented)").split("\n\n"):
                lines.extend(textwrap.wrap(" ".join(para.split()), width, initial_indent=" " * column,
                                           subsequent_indent=" " * column, break_on_hyphens=False))
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def parse_cli(argv: Sequence[str] | None = None) -> tuple[str | None, list[str], dict[str, Any]]:
    """Split a command line into ``(config_path, overrides, flags)``.

    * ``--config PATH`` or ``--config=PATH`` -> ``config_path``
    * ``key=value`` (no leading dashes)      -> ``overrides`` (in order, for :func:`load_config`)
    * ``--name``                             -> ``flags["name"] = True`` (e.g. ``--resume``)
    * ``--name=value``                       -> ``flags["name"] = "value"``

    Dashes in flag names become underscores (``--dry-run`` -> ``flags["dry_run"]``). Anything
    else (a bare word) is a :class:`ConfigError`. ``argv`` defaults to ``sys.argv[1:]``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    config_path: str | None = None
    overrides: list[str] = []
    flags: dict[str, Any] = {}
    i = 0
    while i < len(args):
        item = args[i]
        if item == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file path")
            config_path = args[i + 1]
            i += 2
            continue
        if item.startswith("--config="):
            config_path = item.split("=", 1)[1]
        elif item.startswith("--"):
            name, sep, value = item[2:].partition("=")
            if not name:
                raise ConfigError(f"malformed flag {item!r}")
            flags[name.replace("-", "_")] = value if sep else True
        elif "=" in item and not item.startswith("="):
            overrides.append(item)
        else:
            raise ConfigError(f"unexpected argument {item!r}: use --config PATH, --flag or key=value")
        i += 1
    return config_path, overrides, flags
