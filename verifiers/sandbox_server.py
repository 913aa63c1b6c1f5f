"""Candidate side of asserts mode: run the program, then serve calls of its names.

Runs in the sandboxed candidate process, which holds neither the result channel, nor the
run's nonce, nor the tests: only the program and the two ends of its private channel to
the evaluator (``sandbox_evaluator.py``). Everything here is at the candidate's mercy (it
can patch this module, forge replies, or exit); none of that matters, because the
evaluator decides every verdict from plain data it rebuilds itself. The server's job is
only to let an honest program be called.

Messages (each a length-prefixed ``sandbox_wire`` dict):

- hello, once, after the program ran: ``{"hello": "ok", "names": {name: kind}}`` where
  kind is ``("callable",)``, ``("module", name)`` or ``("data", bytes)``; or
  ``{"hello": "syntax"|"program", "error": str, "memory": bool}``.
- request: ``{"id", "op": "call"|"getattr", "ref": ("n", name)|("h", id), "attr",
  "args": bytes, "kwargs": bytes}``; reply ``{"id", "value": bytes}``,
  ``{"id", "handle": id, "type": str}`` (a class was called), ``{"id", "callable": True}``
  (getattr of a method), ``{"id", "notdata": str}``, or ``{"id", "raised": [MRO names],
  "error": str, "base": bool, "memory": bool}``; ``"mutated"`` lists ``(index, bytes)``
  for positional arguments whose value changed during the call.
"""

import builtins
import os

import sandbox_wire as wire

_read = os.read
_write = os.write
_type = type
_isinstance = isinstance
_callable = callable
_MAX_CONSTANT = 64 << 10  # bytes: top-level data values bigger than this are not visible to tests


def _send(fd, message):
    data = wire.frame(wire.encode(message))
    view = memoryview(data)
    while view:
        view = view[_write(fd, view) :]


def _receive(fd):
    head = wire.read_exact(_read, fd, 4)
    if not head:
        return None
    return wire.decode(wire.read_exact(_read, fd, int.from_bytes(head, "big")))


def _names(namespace):
    names = {}
    for name, value in list(namespace.items()):
        if _type(name) is not str or name.startswith("__"):
            continue
        if _type(value) is _type(os):
            module = getattr(value, "__name__", None)
            if _type(module) is str:
                names[name] = ("module", module)
        elif _callable(value):
            names[name] = ("callable",)
        else:
            try:
                data = wire.encode(value)
            except wire.NotData:
                continue  # not reachable from a test; the evaluator reports a NameError
            if len(data) <= _MAX_CONSTANT:  # a big lookup table stays on this side
                names[name] = ("data", data)
    return names


class _Server:
    def __init__(self, namespace, program):
        self.namespace = namespace
        self.program = program
        self.handles = {}

    def resolve(self, ref):
        kind, key = ref
        return self.namespace[key] if kind == "n" else self.handles[key]

    def handle_of(self, obj):
        for key, held in self.handles.items():
            if held is obj:
                return key
        return None

    def reply(self, request):
        ident = request["id"]
        try:
            target = self.resolve(request["ref"])
            if request["op"] == "getattr":
                value = getattr(target, request["attr"])
                if _callable(value) and not _isinstance(value, _type):
                    return {"id": ident, "callable": True}
                return self.value(ident, value, {})
            if request["attr"] is not None:
                target = getattr(target, request["attr"])
            args = wire.decode(request["args"], self.handles.__getitem__)
            kwargs = wire.decode(request["kwargs"], self.handles.__getitem__)
            before = [wire.encode(a, self.handle_of) for a in args]
            result = target(*args, **kwargs)
        except BaseException as exc:  # SystemExit included: the evaluator decides
            names = [c.__name__ for c in _type(exc).__mro__ if _type(c.__name__) is str]
            return {
                "id": ident,
                "raised": names,
                "error": wire.describe(exc, "<program>", self.program),
                "base": not _isinstance(exc, Exception),
                "memory": _isinstance(exc, MemoryError),
            }
        mutated = []
        for index, arg in enumerate(args):
            try:
                after = wire.encode(arg, self.handle_of)
            except wire.NotData:
                continue
            if after != before[index]:
                mutated.append((index, after))
        if _isinstance(target, _type) and _type(result) is not target:
            pass  # a class whose constructor returned something else: send it as data
        elif _isinstance(target, _type):
            key = str(len(self.handles))
            self.handles[key] = result
            return {"id": ident, "handle": key, "type": wire.type_name(result), "mutated": mutated}
        return self.value(ident, result, {"mutated": mutated})

    def value(self, ident, value, extra):
        try:
            data = wire.encode(value)
        except wire.NotData as exc:
            served = "iterator" if hasattr(_type(value), "__next__") else ("callable" if _callable(value) else None)
            if served is not None:  # a generator or a function: served back through a proxy
                key = str(len(self.handles))
                self.handles[key] = value
                message = {"id": ident, "handle": key, "type": wire.type_name(value), "served": served}
                message.update(extra)
                return message
            message = {"id": ident, "notdata": str(exc)}
        else:
            message = {"id": ident, "value": data}
        message.update(extra)
        return message


def serve(program, request_fd, reply_fd):
    """Run ``program``, say hello, then answer requests until the evaluator closes."""
    try:
        code = compile(program, "<program>", "exec")
    except BaseException as exc:  # SyntaxError, ValueError (NUL bytes), RecursionError, ...
        _send(reply_fd, {"hello": "syntax", "error": wire.describe(exc, "<program>", program), "memory": False})
        return
    # Not "__main__": demo blocks behind `if __name__ == "__main__":` (input(), prints) do
    # not run, as in the reference HumanEval harness.
    namespace = {"__name__": "__solution__", "__builtins__": builtins}
    try:
        exec(code, namespace)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt included on purpose
        _send(
            reply_fd,
            {
                "hello": "program",
                "error": wire.describe(exc, "<program>", program),
                "memory": _isinstance(exc, MemoryError),
            },
        )
        return
    _send(reply_fd, {"hello": "ok", "names": _names(namespace)})
    server = _Server(namespace, program)
    while True:
        request = _receive(request_fd)
        if request is None:
            return
        _send(reply_fd, server.reply(request))
