"""Trusted side of asserts mode: run the test code, calling the candidate through proxies.

The evaluator is a process of the sandbox that never runs a line of the candidate's code.
It runs each test string with its own builtins and modules in a namespace where each of
the candidate's top-level names is a proxy (:class:`Remote`): calling one sends the
arguments as plain data over a private channel to the candidate process
(``sandbox_server.py``) and rebuilds the reply with ``sandbox_wire.decode``, as exact
built-in types. So ``==``, ``isinstance``, ``math.isclose``, ``sorted`` and every other
operation in a test run on the evaluator's terms; the candidate can only hand back data.

What a test may do: define functions, classes and data (HumanEval's ``METADATA`` and
``check(candidate)``); import modules (its own, untouched by the candidate); call the
candidate's top-level functions and classes with plain data or candidate objects as
arguments, by position or keyword; call methods and read data attributes of the objects a
candidate class returns; catch the candidate's exceptions by their built-in base class
(``except ValueError`` catches a candidate ``class E(ValueError)``; the message keeps the
candidate's type name). A list, dict or set argument that the candidate mutates is sent
back after the call and updated in place on the trusted side.

What fails, with a reason naming the construct (a :class:`CandidateFailure`, which a
test's ``except Exception`` cannot swallow, and which fails the test even if a bare
``except`` does): a result that is not plain data (a subclass of int, an object with its
own ``__eq__``; objects are handles only when a class was called, or when the candidate
returns a generator, an iterator or a function: those are served back through proxies,
each value still crossing as plain data); passing a test-defined function or object to
the candidate; operators, ``len``, ``bool``, iteration, indexing or comparison on a
candidate object (a served generator may be iterated); a ``StopIteration`` escaping a
call (a RuntimeError, as PEP 479 makes it for generators, so that ``map`` cannot take it
for the end of the data); the candidate
exiting, being killed or running out of memory during a call. Top-level candidate values
that are not plain data (of at most 64 KiB encoded), callables or modules are not
visible to tests (NameError), nor is any candidate name that is also a builtin's (``def
sorted`` leaves the test the real ``sorted``); a module the candidate imported is
visible as the evaluator's own copy, and only under its own name (``import math``, not
``import fractions as math``). Test code itself is trusted: it may do anything Python
allows, with the sandbox's limits.
"""

import builtins
import os
import select
import signal
import sys

import sandbox_wire as wire

_BUILTIN_TYPES = "None, bool, int, float, complex, str, bytes, tuple, list, set, frozenset, dict"


class CandidateFailure(BaseException):
    """A test fails because of what the candidate did, not because an assert was false.

    A BaseException so that a test's ``except Exception`` cannot turn it into a pass.
    """

    reason = None  # a verdict reason for code.py ("exited early", "crashed"), or None
    memory = False


class NotPlainData(CandidateFailure):
    """The candidate returned something other than plain data."""


class Unsupported(CandidateFailure):
    """The test asked for a construct that cannot cross to the candidate as data."""


class CandidateGone(CandidateFailure):
    """The candidate process ended (exit, signal) or broke the channel protocol."""


class CandidateMemoryError(CandidateFailure):
    """The candidate ran out of memory during a call."""

    memory = True


class CandidateAbort(CandidateFailure):
    """The candidate raised SystemExit, KeyboardInterrupt or another non-Exception."""


class CandidateError(Exception):
    """The candidate raised an exception with no built-in Exception base (never expected)."""


class Remote:
    """A trusted stand-in for a candidate function, class or object; data-only calls."""

    __slots__ = ("_channel", "_ref", "_label")

    def __init__(self, channel, ref, label):
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_ref", ref)
        object.__setattr__(self, "_label", label)

    def __call__(self, *args, **kwargs):
        return self._channel.call(self, None, args, kwargs)

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return self._channel.getattr(self, attr)

    def __repr__(self):
        return f"<candidate {self._label}>"

    def _refuse(self, *args):
        self._channel.refuse(
            f"an operator, len(), bool(), iteration, indexing or a comparison on candidate object {self._label}"
        )

    __setattr__ = __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __bool__ = __len__ = __iter__ = __getitem__ = __contains__ = __add__ = __sub__ = _refuse
    __mul__ = __truediv__ = __floordiv__ = __mod__ = __neg__ = __abs__ = _refuse
    __int__ = __float__ = __index__ = __radd__ = __rsub__ = __rmul__ = _refuse
    __hash__ = object.__hash__


class RemoteIterator(Remote):
    """A generator or iterator the candidate returned: ``next()`` fetches one value as data."""

    __slots__ = ()

    def __iter__(self):
        return self

    def __len__(self):  # as a generator: list() asks for a length hint, and gets none
        raise TypeError(f"{self._label} has no len()")

    def __bool__(self):
        return True

    def __next__(self):
        return self._channel.call(self, "__next__", (), {})


class _Method:
    """A bound method of a candidate object, called by name on the candidate side."""

    __slots__ = ("owner", "attr")

    def __init__(self, owner, attr):
        self.owner, self.attr = owner, attr

    def __call__(self, *args, **kwargs):
        return self.owner._channel.call(self.owner, self.attr, args, kwargs)


class Channel:
    """The evaluator's end of the channel: one request, one reply, in order."""

    def __init__(self, request_fd, reply_fd, pid):
        self.request_fd, self.reply_fd, self.pid = request_fd, reply_fd, pid
        self.next_id = 0
        self.gone = None  # the CandidateGone that ended the channel, once it has
        self.failed = False  # a CandidateFailure was raised during the current test
        self.current = None  # what the pending request asks for, for messages

    def fail(self, exc_type, message):
        self.failed = True
        raise exc_type(message)

    def refuse(self, what):
        self.fail(Unsupported, what + " is not supported (tests compare plain data only)")

    def hello(self):
        return self.receive()

    def send(self, message):
        data = wire.frame(wire.encode(message))
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.request_fd, view) :]
        except OSError:
            self.end("closed its end of the channel")

    def receive(self):
        """Return the next reply (a dict); raise CandidateGone if the candidate is gone."""
        if self.gone is not None:
            self.failed = True
            raise self.gone
        try:
            head = wire.read_exact(os.read, self.reply_fd, 4)
            size = int.from_bytes(head, "big") if head else 0
            if head and size > wire.MAX_MESSAGE:
                raise wire.WireError(f"a reply of {size} bytes (cap {wire.MAX_MESSAGE})")
            message = wire.decode(wire.read_exact(os.read, self.reply_fd, size)) if head else None
        except (OSError, wire.WireError) as exc:
            self.end(f"broke the channel protocol ({exc})")
        if message is None:
            self.end(None)
        if type(message) is not dict:
            self.end("broke the channel protocol (a reply that is not a dict)")
        return message

    def end(self, what):
        """Record that the candidate is gone (and why), then raise CandidateGone.

        A candidate that broke the protocol, or closed its end but lingers, is killed: it
        may be blocked writing a reply nobody will read.
        """
        status = None
        for _ in range(0 if what else 100):  # EOF: it is exiting, or it closed its fds
            done, wait_status = os.waitpid(self.pid, os.WNOHANG)
            if done == self.pid:
                status = wait_status
                break
            select.select([], [], [], 0.005)
        if status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
            status = os.waitpid(self.pid, 0)[1]
            what = what or "closed its end of the channel"
        if what is None and os.WIFEXITED(status):
            what = f"exited with status {os.WEXITSTATUS(status)}"
            reason = "exited early" if os.WEXITSTATUS(status) == 0 else "crashed"
        elif what is None:
            what = f"was killed by signal {os.WTERMSIG(status)}"
            reason = "crashed"
        else:
            reason = "crashed"
        during = f" during {self.current}" if self.current else ""
        self.gone = CandidateGone("the candidate process " + what + during)
        self.gone.reason = reason
        self.failed = True
        raise self.gone

    def call(self, remote, attr, args, kwargs):
        label = remote._label + ("." + attr if attr else "")
        try:
            args_data = wire.encode(list(args), self.handle_of)
            kwargs_data = wire.encode(dict(kwargs), self.handle_of)
        except wire.NotData as exc:
            self.refuse(f"passing {exc} to {label}")
        self.current = label + "()"
        reply = self.request({"op": "call", "ref": remote._ref, "attr": attr, "args": args_data, "kwargs": kwargs_data})
        for index, data in reply.get("mutated") or ():
            _update_in_place(args, index, self.decode(data, label))
        if "handle" in reply:
            handle = ("h", str(reply["handle"]))
            kind = reply.get("served")
            what = wire.short(str(reply.get("type")))
            if kind == "iterator":
                return RemoteIterator(self, handle, f"{what} returned by {label}")
            if kind == "callable":
                return Remote(self, handle, f"{what} returned by {label}")
            return Remote(self, handle, f"{what} instance")
        return self.result(reply, label)

    def getattr(self, remote, attr):
        label = remote._label + "." + attr
        self.current = label
        reply = self.request({"op": "getattr", "ref": remote._ref, "attr": attr})
        if reply.get("callable") is True:
            return _Method(remote, attr)
        return self.result(reply, label)

    def request(self, message):
        if self.gone is not None:
            self.failed = True
            raise self.gone
        self.next_id += 1
        message["id"] = self.next_id
        self.send(message)
        reply = self.receive()
        if reply.get("id") != self.next_id:
            self.end("broke the channel protocol (a reply out of turn)")
        return reply

    def result(self, reply, label):
        if "value" in reply:
            return self.decode(reply["value"], label)
        if "notdata" in reply:
            self.fail(
                NotPlainData,
                "{} returned {}, which is not plain data ({})".format(
                    label, wire.short(str(reply["notdata"])), _BUILTIN_TYPES
                ),
            )
        if "raised" in reply:
            self.raise_candidate(reply, label)
        self.end("broke the channel protocol (a reply with no outcome)")

    def raise_candidate(self, reply, label):
        error = wire.short(str(reply.get("error")))
        if reply.get("memory"):
            self.fail(CandidateMemoryError, f"{label} ran out of memory: {error}")
        if reply.get("base"):
            self.fail(CandidateAbort, f"{label} raised {error}")
        names = reply.get("raised")
        cls = wire.builtin_exception(names if type(names) is list else [])
        if cls in (StopIteration, StopAsyncIteration) and not label.endswith(".__next__"):
            # PEP 479: a StopIteration escaping a call is that call's failure; raised as is,
            # map() or a generator in the test would take it for the end of the data.
            raise RuntimeError(f"in {label}: {error} escaped the call (a failure, as in PEP 479)")
        raise (cls or CandidateError)(f"in {label}: {error}")

    def decode(self, data, label):
        if type(data) is not bytes:
            self.end("broke the channel protocol (a value that is not bytes)")
        try:
            return wire.decode(data)
        except wire.WireError as exc:
            self.fail(NotPlainData, f"{label} returned malformed data ({exc})")

    def handle_of(self, obj):
        if type(obj) in (Remote, RemoteIterator) and obj._channel is self:
            return None if obj._ref[0] != "h" else obj._ref[1]
        return None


def _update_in_place(args, index, new):
    if type(index) is not int or not 0 <= index < len(args):
        return
    old = args[index]
    if type(old) is list and type(new) is list:
        old[:] = new
    elif type(old) in (dict, set) and type(new) is type(old):
        old.clear()
        old.update(new)


def namespace_for(channel, names):
    """Return the test namespace: the evaluator's builtins, proxies for the candidate's names."""
    namespace = {"__name__": "__test__", "__builtins__": builtins}
    if type(names) is not dict:
        return namespace
    for name, kind in names.items():
        if type(name) is not str or type(kind) is not tuple or not kind:
            continue
        if hasattr(builtins, name):  # `def sorted(...)` must not stand in for the real one
            continue
        if kind[0] == "callable":
            namespace[name] = Remote(channel, ("n", name), name)
        elif kind[0] == "module" and len(kind) == 2 and name in (kind[1], _last(kind[1])):
            try:  # the evaluator's own copy of the module the candidate imported
                __import__(kind[1])
                namespace[name] = sys.modules[kind[1]]
            except BaseException:
                pass
        elif kind[0] == "data" and len(kind) == 2 and type(kind[1]) is bytes:
            try:
                namespace[name] = wire.decode(kind[1])
            except wire.WireError:
                pass
    return namespace


def _last(dotted):
    return dotted.rsplit(".", 1)[-1] if type(dotted) is str else None


def run_tests(tests, channel, names, emit):
    """Run each test string in one shared namespace; one ``test`` record per test."""
    namespace = namespace_for(channel, names)
    for index, test in enumerate(tests):
        filename = f"<test {index}>"
        channel.failed = False
        try:
            exec(compile(test, filename, "exec"), namespace)
        except BaseException as exc:
            emit(
                kind="test",
                index=index,
                ok=False,
                error=wire.describe(exc, filename, test),
                memory=isinstance(exc, (MemoryError, CandidateMemoryError)),
                reason=exc.reason if isinstance(exc, CandidateFailure) else None,
            )
            continue
        if channel.failed:  # a bare `except:` in the test swallowed a CandidateFailure
            emit(
                kind="test",
                index=index,
                ok=False,
                reason=None,
                memory=False,
                error="the test caught a failure of the candidate (see earlier tests)",
            )
        else:
            emit(kind="test", index=index, ok=True)
