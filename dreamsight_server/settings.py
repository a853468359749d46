"""Settings declared once, as ``vllm/envs.py`` declares its variables.

A service's settings are a frozen dataclass. Each field that a user may set is
declared with :func:`setting` (its default, help text and limits live in that
one declaration); a field holding another settings dataclass is declared with
:func:`group`. :func:`parse` turns such a class into a command line: the flag
is the field's name in kebab case (``max_model_len`` -> ``--max-model-len``),
its default comes from ``PREFIX`` + the flag in upper snake case
(``DREAMSIGHT_VISION_MAX_MODEL_LEN``) and then from the dataclass. Secrets are
never flags (``ps`` shows flags): they come from ``PREFIX_NAME`` or from the
file named by ``--name-file`` / ``PREFIX_NAME_FILE``. An unknown flag, an
unknown ``PREFIX_*`` variable or a malformed value stops the service at start
with a message naming the setting. Nothing is read at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A setting that is unknown or does not parse; the message names it."""


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | None = None,
    flag: str = "",
    env: str = "",
    minimum: float | None = None,
    choices: Sequence[str] = (),
    secret: bool = False,
    parse: Callable[[str], Any] | None = None,
    repeat: bool = False,
) -> Any:
    """A dataclass field that users set by flag or environment variable.

    ``flag`` and ``env`` override the names derived from the field name (the
    group's prefix still applies, unless the flag is spelled with its
    ``--``); ``parse`` turns one text value into the field's value; with
    ``repeat`` the flag may be given several times and the variable holds a
    comma-separated list (the field is a tuple).
    """
    metadata = {
        "setting": Setting(
            help=help,
            flag=flag,
            env=env,
            minimum=minimum,
            choices=tuple(choices),
            secret=secret,
            parse=parse,
            repeat=repeat,
        )
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def group(
    default_factory: Callable[[], Any], prefix: str = "", build: Callable[..., Any] | None = None
) -> Any:
    """A field holding a nested settings dataclass whose settings are flags too,
    each named ``prefix`` + its own name. ``build`` makes the field's value from
    the nested values (e.g. None when TLS is not configured)."""
    return dataclasses.field(
        default_factory=default_factory, metadata={"group": Group(prefix=prefix, build=build)}
    )


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one field is set from outside (see :func:`setting`)."""

    help: str
    flag: str
    env: str
    minimum: float | None
    choices: tuple[str, ...]
    secret: bool
    parse: Callable[[str], Any] | None
    repeat: bool


@dataclasses.dataclass(frozen=True)
class Group:
    """A nested settings dataclass (see :func:`group`)."""

    prefix: str
    build: Callable[..., Any] | None


@dataclasses.dataclass(frozen=True)
class _Option:
    """One flag of a parsed command line."""

    path: tuple[str, ...]
    """Field names from the top-level class down to this field."""
    flag: str
    env: str
    kind: Any
    default: Any
    spec: Setting

    @property
    def dest(self) -> str:
        return "__".join(self.path)

    def convert(self, text: str) -> Any:
        """One text value (a flag or a variable) as the field's type."""
        if self.spec.repeat:
            return tuple(self._one(part.strip()) for part in text.split(",") if part.strip())
        return self._one(text)

    def _one(self, text: str) -> Any:
        if self.spec.parse is not None:
            try:
                return self.spec.parse(text)
            except ValueError as error:
                raise SettingsError(f"{self.flag}: {error}") from None
        kind, optional = _unwrap(self.kind)
        if optional and text.strip().lower() in ("", "none", "off"):
            return None
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise SettingsError(f"{self.flag}: expected true or false, got {text!r}")
        try:
            value: Any = (
                kind(text) if kind in (int, float) else (Path(text) if kind is Path else text)
            )
        except ValueError:
            raise SettingsError(f"{self.flag}: expected {kind.__name__}, got {text!r}") from None
        if self.spec.choices and value not in self.spec.choices:
            raise SettingsError(
                f"{self.flag}: {text!r} is not one of {', '.join(self.spec.choices)}"
            )
        if (
            self.spec.minimum is not None
            and isinstance(value, int | float)
            and value < self.spec.minimum
        ):
            raise SettingsError(
                f"{self.flag}: {text} is below the minimum of {self.spec.minimum:g}"
            )
        return value


def _unwrap(kind: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); tuple[X, ...] -> (X, False); X -> (X, False)."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        rest = [k for k in typing.get_args(kind) if k is not type(None)]
        return _unwrap(rest[0])[0], True
    if typing.get_origin(kind) is tuple:
        return typing.get_args(kind)[0], False
    return kind, False


def _options(cls: type, defaults: Any, env_prefix: str, flag_prefix: str = "") -> list[_Option]:
    """Every settable field of cls, groups flattened, with its default value."""
    hints = typing.get_type_hints(cls)
    found: list[_Option] = []
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name) if defaults is not None else None
        if "group" in f.metadata:
            grp: Group = f.metadata["group"]
            nested_cls = _unwrap(hints[f.name])[0]
            nested_defaults = value if value is not None else nested_cls()
            for option in _options(
                nested_cls, nested_defaults, env_prefix, flag_prefix + grp.prefix
            ):
                found.append(dataclasses.replace(option, path=(f.name, *option.path)))
        elif "setting" in f.metadata:
            spec: Setting = f.metadata["setting"]
            own = spec.flag or f.name.replace("_", "-")
            # A flag spelled with its dashes is taken as is, outside the group's prefix.
            name = own[2:] if own.startswith("--") else flag_prefix + own
            env = env_prefix + (spec.env or name.replace("-", "_").upper())
            found.append(_Option((f.name,), f"--{name}", env, hints[f.name], value, spec))
    return found


def parse(
    cls: type[T],
    argv: Sequence[str] | None,
    env: Mapping[str, str] | None,
    prog: str,
    description: str,
) -> T:
    """Build ``cls`` from flags (None: sys.argv), then its ``cls.ENV_PREFIX``
    variables (from env, or os.environ when None), then its defaults.

    Raises :class:`SettingsError` for a malformed or unknown setting and
    SystemExit (via argparse) for an unknown flag or ``--help``.
    """
    env = os.environ if env is None else env
    env_prefix: str = getattr(cls, "ENV_PREFIX")  # noqa: B009 (a ClassVar of each settings class)
    base = cls()
    options = _options(cls, base, env_prefix)
    known = {o.env for o in options} | {f"{o.env}_FILE" for o in options if o.spec.secret}
    unknown = sorted(k for k in env if k.startswith(env_prefix) and k not in known)
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]} (see {prog} --help)")
    parser = build_parser(options, prog, description)
    args = vars(parser.parse_args(argv))
    values: dict[tuple[str, ...], Any] = {}
    for o in options:
        values[o.path] = _value(o, args, env)
    return _build(cls, base, values, ())  # type: ignore[no-any-return]


def build_parser(options: list[_Option], prog: str, description: str) -> argparse.ArgumentParser:
    """The argparse parser of a settings class, every flag with its help."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --gateway-secret must not pass as --gateway-secret-file
    )
    for o in options:
        default = _shown(o.default)
        if o.spec.secret:
            parser.add_argument(
                f"{o.flag}-file",
                dest=o.dest,
                metavar="PATH",
                help=f"file holding {o.spec.help.rstrip('.')} (secret: from the file or "
                f"${o.env}, never a flag; env {o.env}_FILE)",
            )
            continue
        text = f"{o.spec.help} (default: {default}; env {o.env})"
        kind = _unwrap(o.kind)[0]
        if kind is bool and o.spec.parse is None:
            parser.add_argument(
                o.flag, dest=o.dest, action=argparse.BooleanOptionalAction, help=text
            )
        else:
            parser.add_argument(
                o.flag,
                dest=o.dest,
                action="append" if o.spec.repeat else "store",
                metavar=kind.__name__.upper() if kind in (int, float) else "TEXT",
                help=text
                + (" (repeatable, or a comma-separated variable)" if o.spec.repeat else ""),
            )
    return parser


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(_shown(v) for v in value) or "none"
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value)
    return text if text else '""'


def _value(o: _Option, args: dict[str, Any], env: Mapping[str, str]) -> Any:
    given = args.get(o.dest)
    if o.spec.secret:
        path = given or env.get(f"{o.env}_FILE", "")
        if path:
            try:
                return Path(path).read_text().strip()
            except OSError as error:
                raise SettingsError(f"{o.flag}-file: cannot read {path}: {error}") from None
        return env.get(o.env, o.default)
    if given is not None:
        if o.spec.repeat:
            return tuple(v for text in given for v in o.convert(text))
        return given if isinstance(given, bool) else o.convert(given)
    if o.env in env:
        try:
            return o.convert(env[o.env])
        except SettingsError as error:
            raise SettingsError(f"{o.env}: {str(error).partition(': ')[2]}") from None
    return o.default


def _build(cls: type, base: Any, values: dict[tuple[str, ...], Any], path: tuple[str, ...]) -> Any:
    """cls with each settable field replaced by its parsed value."""
    changes: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        here = (*path, f.name)
        if "group" in f.metadata:
            grp: Group = f.metadata["group"]
            nested_cls = _unwrap(hints[f.name])[0]
            nested_base = getattr(base, f.name) if base is not None else None
            nested = _build(nested_cls, nested_base or nested_cls(), values, here)
            changes[f.name] = grp.build(nested) if grp.build else nested
        elif "setting" in f.metadata and here in values:
            changes[f.name] = values[here]
    return dataclasses.replace(base, **changes)


def gateway_secret_setting() -> Any:
    """The backends' shared secret with the gateway, declared once for both."""
    return setting(
        "",
        "the secret the gateway sends with every call (x-dreamsight-gateway-token); a "
        "backend without it (or --tls-client-ca) starts only with --trust-any-caller",
        secret=True,
    )


def trust_any_caller_setting() -> Any:
    """The explicit opt-out of caller checks on a backend, declared once for both."""
    return setting(
        False,
        "serve without a gateway secret or client certificates: any process that reaches "
        "the port may claim any tenant (tests, or a network only the gateway can reach)",
    )


def only_the_gateway(settings: T) -> T:
    """A backend started from its command line accepts only the gateway unless
    told otherwise: a shared secret, client certificates (mTLS), or
    --trust-any-caller said out loud. (In-process servers, as tests build them,
    are configured in code and skip this.)"""
    backend: Any = settings  # VisionSettings or DiffusionSettings
    client_ca = backend.server.tls.client_ca if backend.server.tls else ""
    if not backend.gateway_secret and not client_ca and not backend.trust_any_caller:
        raise SettingsError(
            "--gateway-secret: required (or --tls-client-ca for mTLS): without either, any "
            "local process could call this backend as any tenant; pass --trust-any-caller "
            "to serve anyway"
        )
    return settings


def parse_or_exit(parse_settings: Callable[[], T]) -> T:
    """Run a service's parse_settings, turning a SettingsError into exit status 2
    with the message (as argparse does for a bad flag)."""
    try:
        return parse_settings()
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
