"""The one place that decides which characters may reach a shell, ssh or rsync, and how.

Two halves, both pure standard library:

* **Character rules** (used by the config parser, so a bad value is refused before any node
  is contacted): ``host_problem``, ``user_problem``, ``node_path_problem``,
  ``program_problem`` and ``pattern_problem`` return why a value is unsafe, or None.
* **Quoting** (used by every command builder): ``shell_path`` for a node path in a shell
  command, ``ssh_option_value`` for a path inside an ``ssh -o`` option, ``rsync_remote``
  for the ``[user@]host:path`` word of an rsync command line (always sent with
  ``--protect-args``/``--secluded-args``, see ``runner/deploy.py``).

The rules are an allow-list, documented in docs/config.md: what passes them is plain text
to every POSIX shell, to rsync's own argument splitting and to OpenSSH's option parser.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import unicodedata

PATH_PUNCTUATION = "/._-+,=@%:~ "
"""Besides letters and digits, the only characters a node or key path may hold."""

PATH_MAX = 4096
HOST_MAX = 253
USER_MAX = 32

_HOSTNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_ZONE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_PROGRAM = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$")
_TILDE = re.compile(r"^~([A-Za-z0-9._-]*)(/.*)?$")
_RSYNC_PLAIN = re.compile(r"^[A-Za-z0-9_./+,=@%:~-]*$")
"""What old-style rsync argument passing leaves alone: the fallback without --protect-args."""


def _is_control(ch: str) -> bool:
    """Control, format, separator-line or surrogate characters: never printable text."""
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def _first_control(value: str) -> str | None:
    return next((ch for ch in value if _is_control(ch)), None)


def _describe(ch: str) -> str:
    """A character as the error line shows it: ``'`'``, ``'\\n'``, ``'\\x00'``."""
    return repr(ch)


def host_problem(host: str) -> str | None:
    """Why ``host`` is not a host name, IPv4/IPv6 literal or ssh_config alias, or None.

    Refused: empty, whitespace, ``/``, a leading ``-`` (ssh would read an option), control
    characters and every shell metacharacter; IPv6 is written without brackets.
    """
    if not host:
        return "must not be empty"
    if len(host) > HOST_MAX:
        return f"is longer than {HOST_MAX} characters"
    if host.startswith("-"):
        return f"must not start with '-' (ssh would read it as an option), got {host!r}"
    if ":" in host or "%" in host:
        # ipaddress accepts almost anything as a zone (``fe80::1%`id```): check it apart.
        address, percent, zone = host.partition("%")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return f"is not a valid IPv6 address (write it without brackets), got {host!r}"
        if percent and not _ZONE.match(zone):
            return f"invalid IPv6 zone in {host!r} (letters, digits, '.', '_', '-')"
        return None
    if _HOSTNAME.match(host):
        return None
    bad = _first_control(host) or next(
        (ch for ch in host if not (ch.isascii() and (ch.isalnum() or ch in "._-"))), None)
    what = f"character {_describe(bad)}" if bad else "form"
    return (f"invalid {what} in {host!r}: use a host name, an IPv4/IPv6 address or an "
            "ssh_config alias (letters, digits, '.', '_', '-'; starting with a letter, "
            "digit or '_')")


def user_problem(user: str) -> str | None:
    """Why ``user`` is not a POSIX portable user name (letters, digits, ``._-``), or None."""
    if not user:
        return "must not be empty"
    if len(user) > USER_MAX:
        return f"is longer than {USER_MAX} characters"
    if user.startswith("-"):
        return f"must not start with '-' (ssh would read it as an option), got {user!r}"
    if _USER.match(user):
        return None
    return (f"is not a valid user name: {user!r} (letters, digits, '.', '_', '-'; "
            "not starting with '-')")


def path_char_problem(value: str) -> str | None:
    """Why ``value`` holds a character outside the path allow-list, or None.

    Allowed: letters and digits (any script), space and ``/._-+,=@%:~``. Everything else
    (control characters such as newline or NUL, quotes, backslash, backtick, ``$ ; & | < >
    ( ) { } [ ] * ? ! # ^``) is refused: it could be read by a shell or by rsync.
    """
    if len(value) > PATH_MAX:
        return f"is longer than {PATH_MAX} characters"
    bad = _first_control(value)
    if bad is None:
        bad = next((ch for ch in value if not (ch.isalnum() or ch in PATH_PUNCTUATION)), None)
    if bad is None:
        return None
    return (f"character {_describe(bad)} is not allowed in {value!r} (paths may hold "
            f"letters, digits, spaces and {PATH_PUNCTUATION.strip()})")


def node_path_problem(value: str) -> str | None:
    """Why ``value`` is not an absolute or ``~/`` path in the allow-list, or None.

    ``.``/``..`` components are refused too: the deploy target and the directory
    experiments run in must be the same path, with nothing left to resolve.
    """
    why = path_char_problem(value)
    if why:
        return why
    if not (value.startswith("/") or value == "~" or value.startswith("~/")):
        return f"must be an absolute path (or one starting with ~/), got {value!r}"
    if any(part in (".", "..") for part in value.split("/")):
        return f"must not contain '.' or '..' components, got {value!r}"
    return None


def normalize_node_path(value: str) -> str:
    """``value`` without repeated or trailing slashes (``~/a//b/`` -> ``~/a/b``)."""
    out = re.sub(r"/{2,}", "/", value)
    return out.rstrip("/") or "/"


def program_problem(value: str) -> str | None:
    """Why ``value`` is neither a bare command name nor a safe node path, or None."""
    if "/" in value or value.startswith("~"):
        return node_path_problem(value)
    if _PROGRAM.match(value):
        return None
    return (f"is not a command name or an absolute path: {value!r} (a name holds letters, "
            "digits, '.', '_', '+', '-' and does not start with '-')")


def pattern_problem(value: str) -> str | None:
    """Why an rsync filter pattern cannot go on one rule line (control characters), or None."""
    bad = _first_control(value)
    return None if bad is None else f"control character {_describe(bad)} in {value!r}"


# --------------------------------------------------------------------------- quoting


def shell_path(path: str) -> str:
    """Quote a node path for the node's shell while keeping a leading ``~``/``~user`` live."""
    match = _TILDE.match(path)
    if match is None:
        return shlex.quote(path)
    rest = match.group(2) or ""
    return "~" + match.group(1) + ("/" + shlex.quote(rest[1:]) if len(rest) > 1 else rest)


def shell_word(value: str) -> str:
    """Quote any text as one word for a POSIX shell (single quotes); refuses NUL, which no
    shell word, argument or environment value can hold."""
    if "\0" in value:
        raise ValueError(f"NUL character in {value[:60]!r}")
    return shlex.quote(value)


def ssh_option_value(value: str) -> str:
    """Escape a value for an ssh ``-o`` option: ``%`` tokens, then OpenSSH's quoting rules."""
    value = value.replace("%", "%%")
    if re.search(r'[\s"\'\\]', value):
        return '"' + re.sub(r'(["\'\\])', r"\\\1", value) + '"'
    return value


def program_command(program: str, args: list[str]) -> str:
    """A command line running ``program`` (a node path, ``~`` kept live) with quoted ``args``."""
    return " ".join([shell_path(program), *(shlex.quote(a) for a in args)])


def command_line(argv: list[str]) -> str:
    """One command line from words, each quoted for a POSIX shell (and rsync's ``-e`` split)."""
    return shlex.join(argv)


def home_relative(path: str) -> str:
    """A node path as rsync names it: ``~/x`` becomes ``x`` (relative to the login home)."""
    if path == "~" or path.startswith("~/"):
        return path[1:].lstrip("/") or "."
    return path


def rsync_remote(host: str, user: str | None, path: str, *, protected: bool) -> str:
    """The ``[user@]host:path`` word of an rsync command line; raises ``ValueError``.

    Host and user must pass ``host_problem``/``user_problem`` (else rsync could read the
    word as a local path or ssh an option). The path goes to the node verbatim only under
    ``--protect-args`` (``protected``); without it, any character old-style rsync argument
    passing would hand to the node's shell is refused.
    """
    why = host_problem(host) or (user_problem(user) if user is not None else None)
    if why:
        raise ValueError(f"unsafe ssh destination: {why}")
    if "\0" in path or any(unicodedata.category(ch) == "Cs" for ch in path):
        raise ValueError(f"NUL or unencodable character in path {path!r}")
    if not protected and not _RSYNC_PLAIN.match(path):
        raise ValueError(f"path {path!r} needs rsync --protect-args, which the local rsync "
                         "lacks: use letters, digits and /._-+,=@%:~ only")
    where = f"[{host}]" if ":" in host else host
    return f"{user}@{where}:{path}" if user else f"{where}:{path}"
