"""Data-only wire format between the trusted evaluator and the candidate, plus messages.

Runs on both sides of the asserts-mode channel (see ``sandbox_evaluator.py``). A value is
encoded as tag-length-value bytes; :func:`decode` rebuilds it from exact built-in types
only, so nothing the candidate sends can carry behaviour (no ``__eq__``, no subclass, no
pickle, no code). Plain data is None, bool, int, float, complex, str, bytes, and tuples,
lists, sets, frozensets and dicts of them; a candidate object held by the candidate
travels as a handle (an id), never as the object.

Why not json or ``ast.literal_eval``: importing either costs milliseconds (json pulls in
``re``) per sandboxed run, and they cannot tell a tuple from a list or a set from a dict.
Like the harness, this file is plain Python 3.8+ and never imported by the caller's
process for running code: ``sandbox.py`` sends its source into the sandbox.
"""

import builtins

MAX_DEPTH = 64
"""Nesting limit for encoded values (deeper or self-containing values are not data)."""
MAX_MESSAGE = 16 << 20
"""Largest message accepted on the channel, in bytes."""
MAX_INT_BITS = 1 << 20
"""Largest int (in bits) that crosses; bigger ones are refused like non-data."""

_type = type
_len = len
_isinstance = isinstance
_MAX_TEXT = 300


class NotData(Exception):
    """A value of a type outside plain data (the message names the type)."""


class WireError(Exception):
    """Bytes that are not a well-formed message (truncated, bad tag, too deep, too big)."""


def _put_len(out, n):
    out += n.to_bytes(4, "big")


def encode_into(out, value, handle_of=None, depth=0):
    """Append ``value`` to bytearray ``out``; ``handle_of(obj)`` returns an id or None."""
    if depth > MAX_DEPTH:
        raise NotData(f"a value nested deeper than {MAX_DEPTH} levels (or containing itself)")
    t = _type(value)
    if value is None:
        out += b"N"
    elif value is True:
        out += b"T"
    elif value is False:
        out += b"F"
    elif t is int:
        if value.bit_length() > MAX_INT_BITS:
            raise NotData(f"an int of more than {MAX_INT_BITS} bits")
        _put_text(out, b"i", format(value, "x"))
    elif t is float:
        _put_text(out, b"f", value.hex())
    elif t is complex:
        out += b"c"
        _put_text(out, b"f", value.real.hex())
        _put_text(out, b"f", value.imag.hex())
    elif t is str:
        data = value.encode("utf-8", "surrogatepass")
        out += b"s"
        _put_len(out, _len(data))
        out += data
    elif t is bytes:
        out += b"b"
        _put_len(out, _len(value))
        out += value
    elif t in _CONTAINERS:
        out += _CONTAINERS[t]
        _put_len(out, _len(value))
        items = value.items() if t is dict else value
        for item in items:
            if t is dict:
                encode_into(out, item[0], handle_of, depth + 1)
                encode_into(out, item[1], handle_of, depth + 1)
            else:
                encode_into(out, item, handle_of, depth + 1)
    else:
        ident = handle_of(value) if handle_of is not None else None
        if ident is None:
            raise NotData("an object of type " + type_name(value))
        _put_text(out, b"h", str(ident))


_CONTAINERS = {tuple: b"t", list: b"l", set: b"S", frozenset: b"z", dict: b"d"}


def _put_text(out, tag, text):
    data = text.encode("ascii")
    out += tag
    _put_len(out, _len(data))
    out += data


def encode(value, handle_of=None):
    """Return the bytes of ``value``; raises :class:`NotData` for anything else."""
    out = bytearray()
    encode_into(out, value, handle_of)
    return bytes(out)


class _Reader:
    __slots__ = ("data", "pos", "handle")

    def __init__(self, data, handle):
        self.data, self.pos, self.handle = data, 0, handle

    def take(self, n):
        end = self.pos + n
        if end > _len(self.data):
            raise WireError("truncated message")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def length(self):
        return int.from_bytes(self.take(4), "big")

    def text(self):
        return self.take(self.length()).decode("ascii")

    def value(self, depth=0):
        if depth > MAX_DEPTH:
            raise WireError("value nested too deep")
        tag = self.take(1)
        if tag in _ATOMS:
            return _ATOMS[tag]
        if tag == b"i":
            return int(self.text(), 16)
        if tag == b"f":
            return float.fromhex(self.text())
        if tag == b"c":
            real, imag = self.value(depth + 1), self.value(depth + 1)
            if _type(real) is not float or _type(imag) is not float:
                raise WireError("complex parts must be floats")
            return complex(real, imag)
        if tag == b"s":
            return self.take(self.length()).decode("utf-8", "surrogatepass")
        if tag == b"b":
            return bytes(self.take(self.length()))
        if tag == b"h":
            if self.handle is None:
                raise WireError("a handle where only data is allowed")
            return self.handle(self.text())
        count = self.length()
        if tag == b"d":
            return {self.value(depth + 1): self.value(depth + 1) for _ in range(count)}
        if tag in _BUILD:
            return _BUILD[tag](self.value(depth + 1) for _ in range(count))
        raise WireError(f"unknown tag {tag!r}")


_ATOMS = {b"N": None, b"T": True, b"F": False}
_BUILD = {b"t": tuple, b"l": list, b"S": set, b"z": frozenset}


def decode(data, handle=None):
    """Rebuild a value from ``data`` as exact built-in types; ``handle(id)`` maps handles.

    Raises :class:`WireError` for malformed bytes (including unhashable set members or
    dict keys, which surface as TypeError inside and are converted here).
    """
    reader = _Reader(data, handle)
    try:
        value = reader.value()
    except WireError:
        raise
    except (ValueError, TypeError, UnicodeError, OverflowError, RecursionError) as exc:
        raise WireError("malformed value: " + _type(exc).__name__) from None
    if reader.pos != _len(data):
        raise WireError("trailing bytes after the value")
    return value


def read_exact(read, fd, n):
    """Read exactly ``n`` bytes from ``fd`` with ``read`` (os.read); b"" at a clean EOF."""
    chunks, left = [], n
    while left:
        chunk = read(fd, min(left, 1 << 20))
        if not chunk:
            if left == n:
                return b""
            raise WireError("truncated message")
        chunks.append(chunk)
        left -= _len(chunk)
    return b"".join(chunks)


def frame(body):
    """Prefix a message body with its length."""
    return _len(body).to_bytes(4, "big") + body


def type_name(value):
    """Return the value's type as ``module.Name`` (just ``Name`` for builtins)."""
    t = _type(value)
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", "?")
    module = getattr(t, "__module__", None)
    if not _isinstance(name, str):
        name = "?"
    if _isinstance(module, str) and module not in ("builtins", "__solution__"):
        name = module + "." + name
    return name


def short(text):
    """One line of at most ``_MAX_TEXT`` characters."""
    text = " ".join(text.split())
    return text if _len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


def describe(exc, filename, source):
    """One line: exception type, message, and the failing line of ``source`` if known."""
    try:
        name = _type(exc).__name__
        if _isinstance(exc, SyntaxError):
            return short(f"{name} at line {exc.lineno}: {exc.msg}")
        lineno = None
        tb = exc.__traceback__
        while tb is not None:  # the innermost frame that belongs to this source wins
            if tb.tb_frame.f_code.co_filename == filename:
                lineno = tb.tb_lineno
            tb = tb.tb_next
        text = str(exc)
        out = name + (": " + text if text else "")
        lines = source.splitlines()
        if lineno is not None and 0 < lineno <= _len(lines):
            out += f" at line {lineno}: {lines[lineno - 1].strip()}"
        return short(out)
    except BaseException:  # a hostile __str__ must not take the harness down
        return "exception (unprintable)"


def builtin_exception(names):
    """Return the first name in ``names`` (an MRO) that is a built-in Exception type."""
    for name in names:
        candidate = getattr(builtins, name, None) if _type(name) is str else None
        if _isinstance(candidate, type) and issubclass(candidate, Exception):
            return candidate
    return None
