"""Configs: typed dataclasses, YAML composition, ``key=value`` overrides and a ~40-line ``instantiate``.

A run is configured in three layers, each a plain ``dict`` until the last step:

1. ``load_yaml(path)`` for every YAML file, merged with ``compose(base, experiment, ...)`` (later wins);
2. ``apply_overrides(d, ["algo.lr=3e-4", "+algo.new_key=1", "~logging.wandb"])`` from the command line;
3. ``from_dict(TrainerConfig, d)`` builds the trainer's typed dataclass, checking every key and type (floats must
   be finite), ``check_node(node)`` checks that an object node's import path and arguments are good without
   building anything, and ``instantiate(node)`` turns ``{"_component_": "package.module.Name", **kwargs}`` nodes
   into objects.

The import path in ``_component_`` *is* the registry (torchtune style): there is no table of names to keep in
sync. Every mistake raises ``ConfigError`` with one message that names the offending key and says what to fix;
``rl/train.py`` prints it and exits with status 2.

Typed configs declare each field with ``option(default, help="...")`` so that the help text lives next to the
default; ``__post_init__`` validates ranges with ``check(cond, key, msg)``::

    @dataclass
    class AlgoConfig:
        lr: float = option(3e-4, help="AdamW learning rate.")
        clip_range: float = option(0.2, help="PPO ratio clip epsilon (eq. 7).")

        def __post_init__(self):
            check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import importlib
import inspect
import math
import pathlib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import yaml

__all__ = [
    "COMPONENT_KEY",
    "ConfigError",
    "apply_overrides",
    "check",
    "check_node",
    "compose",
    "config_help",
    "from_dict",
    "instantiate",
    "load_yaml",
    "option",
    "to_dict",
    "to_yaml",
    "unknown_choice",
]

COMPONENT_KEY = "_component_"
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


class ConfigError(Exception):
    """A configuration mistake; the message says which key is wrong and what to do about it."""


# ----------------------------------------------------------------------------------------------------------
# helpers


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ``ConfigError(f"{key}: {msg}")`` unless ``cond``; for dataclass ``__post_init__`` range checks."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING) -> Any:  # noqa: A002
    """A dataclass field with its help text in ``metadata["help"]``; ``help`` is required on purpose."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help})


def _did_you_mean(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""


def _suggest(name: str, options: Sequence[str], noun: str) -> str:
    """`` — did you mean 'lr'? valid keys: a, b`` (or ``; valid keys: a, b`` when nothing is close)."""
    hint = _did_you_mean(name, options)
    return f"{hint or ';'} valid {noun}: {', '.join(options) if options else '(none)'}"


def unknown_choice(key: str, name: str, options: Sequence[str], noun: str) -> ConfigError:
    """``ConfigError("--algo: unknown 'grop' — did you mean 'grpo'? valid choices: ddpo, draft, grpo, nft")``."""
    return ConfigError(f"{key}: unknown '{name}'{_suggest(name, options, noun)}")


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


# ----------------------------------------------------------------------------------------------------------
# instantiate: the whole registry


def _import(target: str, path: str) -> Any:
    """Import ``package.module.Name`` (or ``package.module.Class.attr``): longest importable module prefix."""
    if not _IMPORT_PATH.match(target):
        raise ConfigError(f"{path}: '{target}' is not an import path; `_component_` must be a full import path like "
                          f"'torch.optim.AdamW'")
    parts = target.split(".")
    error: Exception | None = None
    for i in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # Only "this prefix is not a module" is a reason to try a shorter prefix; a module that exists but
            # fails to import (a missing dependency inside it) is reported as is.
            if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
                error = error or e
                continue
            raise ConfigError(f"{path}: importing '{target}' failed: {e}") from e
        except ImportError as e:  # the module exists but one of its own imports fails (a missing name, a bad build)
            raise ConfigError(f"{path}: importing '{target}' failed: {e}") from e
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                public = [n for n in dir(obj) if not n.startswith("_")]
                raise ConfigError(
                    f"{path}: cannot import '{target}': '{obj.__name__}' has no attribute '{attr}'"
                    f"{_did_you_mean(attr, public)}"
                )
            obj = getattr(obj, attr)
        return obj
    reason = f" ({error})" if error is not None else ""
    raise ConfigError(
        f"{path}: cannot import '{target}'{reason}; `_component_` must be a full import path like 'torch.optim.AdamW'"
    )


def _check_kwargs(target: Any, args: tuple, kwargs: dict, path: str) -> None:
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins have no signature; let the call itself complain
        return
    params = sig.parameters.values()
    valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    for key in kwargs:
        if not isinstance(key, str) or not (any_keyword or key in valid):
            raise ConfigError(
                f"{path}: unknown argument '{key}' for {target.__module__}.{target.__qualname__}"
                f"{_suggest(str(key), valid, 'arguments')} (if a --config set it for another component, drop it "
                f"with '~{path}.{key}')"
            )
    if any_keyword:
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(f"{path}: {target.__module__}.{target.__qualname__}: {e}") from e


def _target(node: Mapping, path: str) -> Any:
    """The callable a component node names (its ``_component_`` imported); ConfigError if it is not one."""
    target_name = node[COMPONENT_KEY]
    component_path = _join(path, COMPONENT_KEY)
    if not isinstance(target_name, str):
        raise ConfigError(f"{component_path}: expected an import path string, got {target_name!r}")
    target = _import(target_name, component_path)
    if not callable(target):
        raise ConfigError(f"{component_path}: '{target_name}' is not callable")
    return target


def check_node(node: Any, _path: str = "", injected: Sequence[str] = ()) -> None:
    """Check what ``instantiate(node, **{name: ... for name in injected})`` would build, without calling anything:
    every ``_component_`` imports, is callable and accepts its node's arguments, depth first.

    For validating a whole config before the first (expensive) object is built: a typo in the last node then
    fails before the model in the first one is loaded. Importing the targets is the only side effect.

    Args:
        node: a config node, as for ``instantiate``.
        _path: where the node sits in the whole config, for error messages.
        injected: argument names the caller will pass to the top node (``policy``, ``reward`` for a critic).

    Raises:
        ConfigError: what ``instantiate`` would raise before calling a target — naming the path and valid names.
    """
    if isinstance(node, Mapping):
        if COMPONENT_KEY not in node:
            if injected:
                raise ConfigError(f"{_path or '<root>'}: cannot pass arguments to a node without '_component_'")
            for key, value in node.items():
                check_node(value, _join(_path, str(key)))
            return
        target = _target(node, _path)
        raw = {k: v for k, v in node.items() if k != COMPONENT_KEY and k not in injected}
        _check_kwargs(target, (), {**raw, **dict.fromkeys(injected)}, _path or "<root>")
        for key, value in raw.items():
            check_node(value, _join(_path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_node(value, _join(_path, i))
    elif injected:
        raise ConfigError(f"{_path or '<root>'}: cannot pass arguments to a non-component value {node!r}")


def instantiate(node: Any, *args: Any, _path: str = "", **overrides: Any) -> Any:
    """Build the object a config node describes.

    A node is ``{"_component_": "package.module.Name", **kwargs}``: the target is imported and called with the
    kwargs (nested nodes inside them, in dicts and lists too, are instantiated first, depth first), then with
    ``*args`` and ``**overrides`` from the caller, which win over the config (e.g. ``params`` for an optimizer).
    A dict without ``_component_`` becomes a dict of instantiated values, a list a list; other values are
    returned unchanged. The input is not modified.

    Args:
        node: the config node (typically a ``dict[str, Any]`` field of a trainer config).
        _path: where the node sits in the whole config (``"critic.reward"``), for error messages.

    Raises:
        ConfigError: bad import path, unknown or missing argument — naming ``_path`` and the valid names.
    """
    if isinstance(node, Mapping):
        if COMPONENT_KEY not in node:
            if args or overrides:
                raise ConfigError(f"{_path or '<root>'}: cannot pass arguments to a node without '_component_'")
            return {k: instantiate(v, _path=_join(_path, k)) for k, v in node.items()}
        target = _target(node, _path)
        raw = {k: v for k, v in node.items() if k != COMPONENT_KEY and k not in overrides}
        # check names before building children, so a typo fails before any expensive nested object is built
        _check_kwargs(target, args, {**raw, **overrides}, _path or "<root>")
        kwargs = {k: instantiate(v, _path=_join(_path, k)) for k, v in raw.items()}
        return target(*args, **kwargs, **overrides)
    if args or overrides:
        raise ConfigError(f"{_path or '<root>'}: cannot pass arguments to a non-component value {node!r}")
    if isinstance(node, list):
        return [instantiate(v, _path=_join(_path, i)) for i, v in enumerate(node)]
    return node


@contextlib.contextmanager
def loading(what: str):
    """Errors raised while a component is built from its files (weights, model configs, tokenizers, prompt files) as
    a ConfigError naming the config node ``what``: a damaged or mismatched file is a bad input to report in one line,
    not a traceback. ConfigError and FileNotFoundError (whose messages already name the path) pass unchanged."""
    try:
        yield
    except (ConfigError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 -- diffusers / transformers / open_clip / safetensors raise many kinds
        text = str(e).strip()
        first = text.splitlines()[0] if text else ""
        if len(first) > 300:
            first = first[:300] + "..."
        kind = "" if isinstance(e, ValueError) and type(e).__module__ == "builtins" else f"{type(e).__name__}: "
        raise ConfigError(f"{what}: {kind}{first} (check the files and settings of '{what}')") from e


def build(node: Any, what: str, **overrides: Any) -> Any:
    """``instantiate(node, _path=what, **overrides)`` with the errors of loading files reported as ConfigError."""
    with loading(what):
        return instantiate(node, _path=what, **overrides)


# ----------------------------------------------------------------------------------------------------------
# typed configs


def _parse_scalar(text: str) -> Any:
    """A command-line string as YAML reads it ("3" -> 3, "true" -> True); None when it is not valid YAML."""
    try:
        return _safe_load(text)
    except yaml.YAMLError:
        return None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where lossless; raise ConfigError otherwise."""
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    error = ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")

    if origin is Union or origin is types.UnionType:
        if value is None:
            if type(None) in args:
                return None
            raise error
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise error
    if origin is Literal:
        for allowed in args:
            # `type(...) is` so that True does not match Literal[1] (True == 1 in Python)
            if type(value) is type(allowed) and value == allowed:
                return value
        raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, path=key)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise error
        if tp is list or tp is tuple or not args:
            return list(value) if (origin or tp) is list else tuple(value)
        if origin is list:
            return [_coerce(v, args[0], _join(key, i)) for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], _join(key, i)) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} items ({_type_name(tp)}), got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, _join(key, i)) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise error
        if not args:
            return dict(value)
        return {_coerce(k, args[0], key): _coerce(v, args[1], _join(key, str(k))) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and isinstance(_parse_scalar(value), bool):
            return _parse_scalar(value)
        raise error
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            parsed = _parse_scalar(value)
            if isinstance(parsed, int) and not isinstance(parsed, bool):
                return parsed
        raise error
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise error
        try:
            # PyYAML follows YAML 1.1, where "1e-4" (no dot) is a string; float() accepts it.
            number = float(value)
        except (ValueError, OverflowError):
            raise error from None
        # No setting means NaN or infinity (a switch-off is None, or 0 where documented), and NaN passes every
        # range check written as `check(x > 0, ...)`: reject them here, once for every config.
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r} (quote it in YAML: '{value}')")
    if tp is pathlib.Path:
        if isinstance(value, (str, pathlib.Path)):
            return pathlib.Path(value)
        raise error
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise error
    raise ConfigError(f"{key}: unsupported annotation {tp!r} in a config dataclass")


def from_dict(cls: type, d: Mapping[str, Any], path: str = "") -> Any:
    """Build the (nested) dataclass ``cls`` from a plain dict, checking keys and types.

    Unknown keys raise with a did-you-mean and the list of valid keys; missing required keys raise with the
    field's help text; values are checked against the annotations (``int`` is accepted for ``float``, strings
    from the command line are parsed for numbers and bools, ``Optional``/``Literal``/``list``/``tuple``/
    ``dict`` and nested dataclasses are handled; ``dict[str, Any]`` passes ``_component_`` nodes through).
    Range checks stay in the dataclass's ``__post_init__`` (use ``check``).

    Args:
        cls: a dataclass type.
        d: its values, e.g. from ``load_yaml`` + ``apply_overrides``.
        path: the dotted location of ``d`` in the whole config, prefixed to every error.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict expects a dataclass type, got {cls!r}")
    if not isinstance(d, Mapping):
        raise ConfigError(f"{path or '<root>'}: expected a mapping for {cls.__name__}, got {type(d).__name__} {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in d:
        if key not in fields:
            raise ConfigError(f"unknown key '{_join(path, str(key))}'{_suggest(str(key), list(fields), 'keys')}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name in d:
            kwargs[name] = _coerce(d[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            help_text = f.metadata.get("help", "")
            raise ConfigError(
                f"missing required key '{key}' ({_type_name(hints[name])}){': ' + help_text if help_text else ''}"
            )
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # __post_init__ checks name the field (check(..., "lr", ...)); prefix where the dataclass sits
        if path:
            raise ConfigError(f"{path}.{e}") from None
        raise


def config_help(cls: type, path: str = "") -> str:
    """One line per (nested) field: ``key (type, default): help`` — for ``--help`` output and docs."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        key = _join(path, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}: {f.metadata.get('help', '')}")
            lines.append(config_help(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        lines.append(f"{key} ({_type_name(tp)}, {default}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


def to_dict(cfg: Any) -> Any:
    """A dataclass (or dict/list of them) as plain YAML/JSON-safe values: tuples → lists, Paths → str."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, pathlib.PurePath):
        return str(cfg)
    return cfg


def to_yaml(cfg: Any, path: str | pathlib.Path | None = None) -> str:
    """The resolved config as YAML (field order kept); also written to ``path`` if given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    if path is not None:
        # local import: checkpoint imports torch, and configs should load without it
        from rl.checkpoint import atomic_write_bytes

        atomic_write_bytes(path, text.encode())
    return text


# ----------------------------------------------------------------------------------------------------------
# YAML files, composition, overrides


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (PyYAML keeps the last one silently,
    so ``lr: 1e-4`` ten lines above ``lr: 3e-4`` would be ignored without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 core-schema scalars instead of PyYAML's YAML 1.1 ones, for config files and key=value overrides alike:
# `1e-4` is a float (1.1 reads a string: no dot), `no` / `on` / `off` stay strings (1.1: booleans, so
# `run.mixed_precision=no` became False), `010` stays a string (1.1: octal 8, silently) and `1:30` too (1.1: 90).
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$")
_FLOAT = re.compile(r"^[-+]?(?:(?:0|[1-9][0-9_]*)(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$"
                    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: only plain YAML types, never Python objects


def _yaml_problem(e: yaml.YAMLError, source: str = "") -> str:
    """A YAML error in one line, ``source:line:column: problem`` (PyYAML's own text spans several lines)."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}: " if mark is not None and source else ""
        return f"{where}{e.problem or e.context or 'syntax error'}"
    return f"{source + ': ' if source else ''}{' '.join(str(e).split())}"


def load_yaml(path: str | pathlib.Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, a syntax error (with line:column), a key written twice or a non-mapping
    raise ConfigError."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): is it a YAML file?") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {_yaml_problem(e, str(path))}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def compose(*dicts: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge config dicts, later wins. Lists are replaced, not appended.

    A node whose ``_component_`` changes is replaced as a whole: kwargs meant for the old target must not leak
    into the new one.
    """
    out: dict[str, Any] = {}
    for d in dicts:
        out = _merge(out, d)
    return out


def _merge(base: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    if COMPONENT_KEY in new and base.get(COMPONENT_KEY, new[COMPONENT_KEY]) != new[COMPONENT_KEY]:
        return copy.deepcopy(dict(new))
    out = copy.deepcopy(dict(base))
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _did_you_mean_key(prefix: list[str], name: str, options: Any) -> str:
    """Did-you-mean with the full dotted key (``algo.lr``), as the user would type it."""
    hint = _did_you_mean(name, [str(o) for o in options])
    return hint.replace("'", "'" + ".".join(prefix) + ".", 1) if hint and prefix else hint


def _walk(d: Any, parts: list[str], override: str, create: bool) -> Any:
    """The container holding ``parts[-1]``; creates missing dicts when ``create``."""
    node = d
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                raise ConfigError(f"override '{override}': '{where}' is not an index of a list of {len(node)}")
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                if not create:
                    hint = _did_you_mean_key(parts[:depth], part, node)
                    raise ConfigError(
                        f"override '{override}': key '{where}' does not exist{hint} (prefix with + to add a new key)"
                    )
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(
                f"override '{override}': '{'.'.join(parts[:depth])}' is a {type(node).__name__}, not a mapping"
            )
    return node


def apply_overrides(d: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply command-line overrides to a config dict, returning a new dict.

    - ``a.b=3`` sets an existing key (values parsed with ``yaml.safe_load``: ``x=[1,2]``, ``name=foo``,
      ``flag=true``, ``x=null``); a key that does not exist is an error with a did-you-mean;
    - ``+a.b=3`` adds a new key (intermediate mappings are created); an existing key is an error;
    - ``~a.b`` deletes a key.
    Digits address list items: ``rewards.0.weight=2``.
    """
    out = copy.deepcopy(dict(d))
    for override in overrides:
        if override.startswith("~"):
            parts = override[1:].split(".")
            if "=" in override or not all(parts):
                raise ConfigError(f"override '{override}': deletion takes a key only, like ~a.b")
            parent = _walk(out, parts, override, create=False)
            last = parts[-1]
            if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
                del parent[int(last)]
            elif isinstance(parent, dict) and last in parent:
                del parent[last]
            else:
                options = list(parent) if isinstance(parent, dict) else []
                hint = _did_you_mean_key(parts[:-1], last, options)
                raise ConfigError(f"override '{override}': key '{override[1:]}' does not exist{hint}")
            continue
        key, sep, raw = override.partition("=")
        add = key.startswith("+")
        key = key[1:] if add else key
        parts = key.split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override '{override}' must look like key=value, +new.key=value or ~key")
        try:
            value = _safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{override}': cannot parse the value {raw!r} as YAML: "
                              f"{_yaml_problem(e)}") from e
        parent = _walk(out, parts, override, create=add)
        last = parts[-1]
        if isinstance(parent, list):
            if not (last.isdigit() and int(last) < len(parent)) or add:
                raise ConfigError(f"override '{override}': '{key}' is not an existing index of a list of {len(parent)}")
            parent[int(last)] = value
        elif isinstance(parent, dict):
            if add and last in parent:
                raise ConfigError(f"override '{override}': key '{key}' already exists; drop the + to override it")
            if not add and last not in parent:
                raise ConfigError(
                    f"override '{override}': key '{key}' does not exist{_did_you_mean_key(parts[:-1], last, parent)} "
                    f"(prefix with + to add a new key)"
                )
            parent[last] = value
        else:
            raise ConfigError(
                f"override '{override}': '{'.'.join(parts[:-1])}' is a {type(parent).__name__}, not a mapping"
            )
    return out
