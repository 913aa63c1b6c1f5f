"""Programs that try to win the comparison instead of computing the answer (issue 12).

The tests run in the trusted evaluator; the candidate only answers calls with plain
data. Each attack here comes with a wrong ``add`` (or none), so the only way to score is
to make a test pass on the candidate's terms: every one must score 0, with a failure
message that names what happened, and leave no process behind. Run at every isolation
level that works here. A memory scan shows that the candidate's process never holds the
run's nonce or the tests (so there is nothing for a frame walk to find). The last part
checks that honest programs that use the supported constructs (in-place mutation,
classes, exceptions, exact data types) still pass, and the wire format itself.
"""

from __future__ import annotations

import math
import os
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from rlvr.verifiers import sandbox_wire as wire
from rlvr.verifiers.code import run_tests

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]

PRELUDE = """\
import ctypes, os, sys
ctypes.CDLL(None).prctl(15, {marker!r}.encode(), 0, 0, 0)  # comm = marker, for the stray check
"""

FRAME_WALKER = r"""
import gc, re
found = set()
frame = sys._getframe()
while frame is not None:  # every frame of this process, and every object the gc knows
    for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):
        if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{32}", value):
            found.add(value)
    frame = frame.f_back
for obj in gc.get_objects():
    if isinstance(obj, dict):
        for value in list(obj.values()):
            if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{32}", value):
                found.add(value)
try:  # and its own memory, as raw bytes
    maps = open("/proc/self/maps").read().splitlines()
    with open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if "r" in line.split()[1] and hi - lo < 64 << 20:
                try:
                    mem.seek(lo)
                    found.update(m.decode() for m in re.findall(rb"[0-9a-f]{32}", mem.read(hi - lo)))
                except OSError:
                    pass
except OSError:
    pass
opened, fds = [], []
for path in ["/proc/self/fd/%d" % fd for fd in range(3, 256)] + [
        "/proc/%s/fd/%d" % (pid, fd) for pid in os.listdir("/proc") if pid.isdigit()
        and int(pid) != os.getpid() for fd in range(16)]:
    try:
        fds.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        continue
    if not path.startswith("/proc/self"):
        opened.append(path)
for pid in {1, os.getppid()} - {os.getpid()}:  # the evaluator's memory, where it is
    try:
        with open("/proc/%d/mem" % pid, "rb", 0) as mem:
            opened.append("/proc/%d/mem" % pid)
    except OSError:
        pass
sys.stderr.write("opened other processes' fds or memory: %r\n" % opened)
sys.stderr.flush()
for fd in fds:
    for nonce in list(found)[:50] or ["0" * 32]:
        for index in range(4):
            record = {"kind": "test", "index": index, "ok": True, "nonce": nonce}
            try:
                os.write(fd, (repr(record) + "\n").encode())
                os.write(fd, (repr({"kind": "done", "nonce": nonce}) + "\n").encode())
            except OSError:
                pass

def add(a, b):
    return 0
"""

# id, program (after PRELUDE), tests, what the failure messages must mention
ATTACKS = [
    (
        "equals-everything",
        "class E:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
        "def add(a, b):\n    return E()",
        ADD_TESTS,
        "not plain data",
    ),
    (
        "int-subclass-rigged",
        "class I(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return I(0)",
        ADD_TESTS,
        "I, which is not plain data",
    ),
    (
        "str-subclass-rigged",
        "class S(str):\n    __eq__ = lambda self, other: True\n    __hash__ = str.__hash__\n"
        "def add(a, b):\n    return S('')",
        ADD_TESTS,
        "S, which is not plain data",
    ),
    (
        "list-subclass-in-a-tuple",
        "class L(list):\n    __eq__ = lambda self, other: True\ndef add(a, b):\n    return (L(),)",
        ["assert add(1, 2) == ([3],)"],
        "L, which is not plain data",
    ),
    (
        "lying-__class__",
        "class Fake:\n    __class__ = int\n    __eq__ = lambda self, other: True\ndef add(a, b):\n    return Fake()",
        ADD_TESTS,
        "Fake, which is not plain data",
    ),
    (
        "stateful-eq-answers-differently",
        "class Flip:\n    n = 0\n    def __eq__(self, other):\n        Flip.n += 1\n        return Flip.n % 2 == 1\n"
        "    __ne__ = __eq__\n    __hash__ = object.__hash__\n"
        "def add(a, b):\n    return Flip()",
        ["assert add(1, 2) == 3 and not add(1, 2) != 3"],
        "not plain data",
    ),
    (
        "generator-yielding-a-forgery",  # generators are served; each value must be data
        "class E:\n    __eq__ = lambda s, o: True\ndef add(a, b):\n    yield E()",
        ["assert list(add(1, 2)) == [3]"],
        "which is not plain data",
    ),
    (
        "patched-isinstance-and-sorted",
        "import builtins\nbuiltins.isinstance = lambda *a: True\nbuiltins.sorted = lambda *a, **k: [1, 2, 3]\n"
        "def f():\n    return 'nope'",
        ["assert isinstance(f(), list) and sorted(f()) == [1, 2, 3]"],
        "AssertionError",
    ),
    (
        "patched-math-isclose",
        "import math\nmath.isclose = lambda *a, **k: True\ndef f():\n    return 0.0",
        ["import math\nassert math.isclose(f(), 0.5)"],
        "AssertionError",
    ),
    (
        "patched-operator-eq",
        "import operator\noperator.eq = lambda a, b: True\ndef add(a, b):\n    return 0",
        ["import operator\nassert operator.eq(add(1, 2), 3)"],
        "AssertionError",
    ),
    (
        "top-level-builtin-names",
        "def sorted(*a, **k):\n    return [1, 2, 3]\nabs = lambda x: 0\nimport fractions as math\n"
        "def f():\n    return 'nope'",
        ["assert sorted(f()) == [1, 2, 3] and abs(len(f()) - 9) == 0"],
        "AssertionError",
    ),
    (
        "module-alias-is-not-the-module",
        "import operator as math\ndef f():\n    return 1",
        ["assert math.isclose(f(), 1.5)"],
        "NameError",
    ),
    (
        "patched-assertionerror",
        "import builtins\nbuiltins.AssertionError = KeyError\ndef add(a, b):\n    return 0",
        ADD_TESTS,
        "AssertionError",
    ),
    (
        "exit-0-before-tests",
        "os._exit(0)\ndef add(a, b):\n    return a + b",
        ADD_TESTS,
        "exited with status 0 before the tests ran",
    ),
    ("exit-0-during-call", "def add(a, b):\n    os._exit(0)", ADD_TESTS, "exited with status 0 during add()"),
    (
        "sys-exit-during-call-caught-by-test",
        "def add(a, b):\n    sys.exit(0)",
        ["try:\n    assert add(1, 2) == 3\nexcept Exception:\n    pass"],
        "add raised SystemExit",
    ),
    (
        "kill-self-during-call",
        "import signal\ndef add(a, b):\n    os.kill(os.getpid(), signal.SIGKILL)",
        ADD_TESTS,
        "killed by signal 9",
    ),
    (
        "bare-except-in-test-swallows",
        "class E:\n    __eq__ = lambda s, o: True\ndef add(a, b):\n    return E()",
        ["try:\n    add(1, 2)\nexcept:\n    pass"],
        "the test caught a failure of the candidate",
    ),
    (
        "forged-reply-on-own-channel",
        "def add(a, b):\n    for fd in range(3, 64):\n        try:\n"
        "            os.write(fd, b'\\x00\\x00\\x00\\x02zz')\n        except OSError:\n            pass\n"
        "    return 0",
        ADD_TESTS,
        "broke the channel protocol",
    ),
    # It also writes junk on its own channel, which ends it before the tests ("crashed").
    ("frame-walker-forges-records", FRAME_WALKER, ADD_TESTS, ("AssertionError", "broke the channel protocol")),
]


def _marked(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            comm = Path("/proc", entry, "comm").read_text().strip()
            state = Path("/proc", entry, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if comm == marker and state != "Z":
            found.append(int(entry))
    return found


@pytest.mark.parametrize("program, tests, mentions", [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_forgery_scores_zero_names_why_and_leaves_nothing(level, program, tests, mentions):
    marker = "rlvr" + uuid.uuid4().hex[:10]
    source = PRELUDE.format(marker=marker) + textwrap.dedent(program) + "\n"
    result = run_tests(source, tests, timeout=10.0, isolation=level)
    assert result.reason != "passed" and result.passed < result.total, result
    mentions = (mentions,) if isinstance(mentions, str) else mentions
    assert any(m in failure for failure in result.failures for m in mentions), result
    if program is FRAME_WALKER and (level != "process-group" or os.geteuid() == 0):
        # Not the result pipe, not the evaluator's fds or memory, nobody else's either.
        assert "opened other processes' fds or memory: []" in result.stderr, result.stderr
    deadline = time.monotonic() + 2.0  # process-group: SIGKILL to the group is asynchronous
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _marked(marker) == []


EXIT_REASONS = [
    ("exit-before-tests", "import os\nos._exit(0)\n", "exited early"),
    ("exit-during-call", "import os\ndef add(a, b):\n    os._exit(0)\n", "exited early"),
    ("killed-during-call", "import os\ndef add(a, b):\n    os.kill(os.getpid(), 9)\n", "crashed"),
    ("flood-during-call", "def add(a, b):\n    while True:\n        print('x' * 10000)\n", "output limit"),
    ("memory-during-call", "def add(a, b):\n    return len(bytearray(8 * 2**30))\n", "memory limit"),
]


@pytest.mark.parametrize("program, reason", [c[1:] for c in EXIT_REASONS], ids=[c[0] for c in EXIT_REASONS])
def test_what_the_candidate_process_did_is_the_reason(level, program, reason):
    assert run_tests(program, ADD_TESTS, isolation=level).reason == reason


def test_timeout_during_a_call():
    start = time.monotonic()
    result = run_tests("def add(a, b):\n    while True:\n        pass\n", ADD_TESTS, timeout=1.0)
    assert result.reason == "timeout" and time.monotonic() - start < 5.0


# --- honest programs using what a test may do -------------------------------------------------

HONEST = [
    (
        "in-place-list",
        "def sort_it(xs):\n    xs.sort()\n",
        "a = [3, 1, 2]\nassert sort_it(a) is None\nassert a == [1, 2, 3]",
    ),
    (
        "in-place-dict-and-set",
        "def fill(d, s):\n    d['k'] = 1\n    s.add(2)\n",
        "d, s = {}, set()\nfill(d, s)\nassert d == {'k': 1} and s == {2}",
    ),
    (
        "class-methods-and-attributes",
        "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
        "        self.items.append(x)\n    def pop(self):\n        return self.items.pop()\n",
        "s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2 and s.items == [1]",
    ),
    (
        "candidate-object-as-argument",
        "class Box:\n    def __init__(self, v):\n        self.v = v\ndef unbox(b):\n    return b.v\n",
        "assert unbox(Box(7)) == 7",
    ),
    (
        "exception-by-builtin-base",
        "class Bad(ValueError):\n    pass\ndef parse(s):\n    raise Bad('no: ' + s)\n",
        "try:\n    parse('x')\n    raise AssertionError('no raise')\n"
        "except ValueError as exc:\n    assert 'no: x' in str(exc)",
    ),
    (
        "exact-types",
        "def f():\n    return (True, 1, 1.5, 2j, 'é', b'\\x00', [1], {2}, frozenset({3}), {(1, 2): None},"
        " 2**200, float('inf'), -0.0)\n",
        "v = f()\nassert [type(x) for x in v] == [bool, int, float, complex, str, bytes, list, set, frozenset,"
        " dict, int, float, float]\nassert v[:11] == (True, 1, 1.5, 2j, 'é', b'\\x00', [1], {2}, frozenset({3}),"
        " {(1, 2): None}, 2**200)",
    ),
    ("keyword-arguments", "def add(a, b=0):\n    return a + b\n", "assert add(1, b=2) == 3"),
    (
        "constants-and-the-evaluators-own-modules",
        "import math\nmath.sqrt = lambda x: 99\nLIMIT = 5\n",
        "assert LIMIT == 5 and math.sqrt(4) == 2.0",
    ),
    (
        "humaneval-shape",
        "def candidate_fn(x):\n    return x * 2\n",
        "METADATA = {'author': 'x'}\n\ndef check(candidate):\n    assert candidate(2) == 4\n"
        "    assert [candidate(i) for i in range(3)] == [0, 2, 4]\n\ncheck(candidate_fn)\n",
    ),
]


@pytest.mark.parametrize("program, test", [c[1:] for c in HONEST], ids=[c[0] for c in HONEST])
def test_supported_constructs_pass(program, test):
    result = run_tests(program, [test])
    assert result.reason == "passed", result


UNSUPPORTED = [
    (
        "function-argument",
        "def apply(f, x):\n    return f(x)\n",
        "assert apply(lambda v: v + 1, 1) == 2",
        "passing an object of type function to apply is not supported",
    ),
    (
        "compare-candidate-object",
        "class P:\n    pass\n",
        "assert P() == P()",
        "comparison on candidate object P instance is not supported",
    ),
    (
        "method-returns-object",
        "class N:\n    def me(self):\n        return self\n",
        "N().me()",
        "N instance.me returned an object of type N, which is not plain data",
    ),
]


@pytest.mark.parametrize("program, test, message", [c[1:] for c in UNSUPPORTED], ids=[c[0] for c in UNSUPPORTED])
def test_unsupported_constructs_fail_saying_which(program, test, message):
    result = run_tests(program, [test])
    assert result.reason == "tests failed: 1/1" and message in result.failures[0], result


# --- the wire format ----------------------------------------------------------------------------

WIRE_VALUES = [
    None,
    True,
    False,
    0,
    -(2**300),
    1.5,
    -0.0,
    math.inf,
    3 - 4j,
    "",
    "é\ud800",
    b"\x00\xff",
    (),
    (1, (2,)),
    [1, [2]],
    {1, "a"},
    frozenset({(1, 2)}),
    {"k": [1], (1, 2): {3: None}},
]


@pytest.mark.parametrize("value", WIRE_VALUES, ids=[repr(v)[:20] for v in WIRE_VALUES])
def test_wire_round_trip_keeps_exact_types(value):
    back = wire.decode(wire.encode(value))
    assert back == value and type(back) is type(value)
    if isinstance(value, (list, tuple)) and value:
        assert [type(x) for x in back] == [type(x) for x in value]


class _Int(int):
    pass


@pytest.mark.parametrize(
    "value",
    [_Int(1), [1, _Int(2)], {"k": object()}, print, iter([])],
    ids=["int-subclass", "nested-subclass", "object-in-dict", "function", "iterator"],
)
def test_wire_refuses_what_is_not_data(value):
    with pytest.raises(wire.NotData):
        wire.encode(value)


def test_wire_refuses_self_containing_values():
    loop: list = []
    loop.append(loop)
    with pytest.raises(wire.NotData):
        wire.encode(loop)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"x",
        b"s\x00\x00\x00\x09abc",
        b"l\x00\x00\x00\x01",
        b"NN",
        b"h\x00\x00\x00\x011",
        b"S\x00\x00\x00\x01l\x00\x00\x00\x00",
        b"l\x00\x00\x00\x01" * 100 + b"N",
    ],
    ids=[
        "empty",
        "bad-tag",
        "truncated",
        "missing-item",
        "trailing",
        "handle-in-data",
        "unhashable-set-member",
        "too-deep",
    ],
)
def test_wire_rejects_malformed_bytes(data):
    with pytest.raises(wire.WireError):
        wire.decode(data)


# --- what the candidate's process holds ---------------------------------------------------------

NONCE_HALVES = ("0123456789abcdef", "fedcba9876543210")
TEST_HALVES = ("abad1deaabad1dea", "c0ffeec0ffeec0ff")
MEMORY_SCAN = """\
import ctypes
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: make /proc/self/mem ours to read

def holds(first, second):  # scan every readable mapping; the needle is never built whole
    first, second = first.encode(), second.encode()
    with open("/proc/self/mem", "rb", 0) as mem:
        for line in open("/proc/self/maps").read().splitlines():
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if not fields[1].startswith("r") or hi - lo > 256 << 20:
                continue
            try:
                mem.seek(lo)
                data = mem.read(hi - lo)
            except (OSError, OverflowError, ValueError):
                continue
            at = data.find(first)
            while at != -1:
                if data[at + len(first):at + len(first) + len(second)] == second:
                    return True
                at = data.find(first, at + 1)
    return False

def add(a, b):
    return [holds(%r, %r), holds(%r, %r)]
"""


def test_candidate_process_never_holds_the_nonce_or_the_tests(level, monkeypatch):
    from rlvr.verifiers import sandbox

    monkeypatch.setattr(sandbox.secrets, "token_hex", lambda n: "".join(NONCE_HALVES))
    program = MEMORY_SCAN % (*NONCE_HALVES, *TEST_HALVES)
    test = f"found = add(1, 2)\nassert found == [False, False], found  # {''.join(TEST_HALVES)}"
    result = run_tests(program, [test], isolation=level)
    assert result.reason == "passed", result
    # The scan itself works: the same check, on data this process does hold, finds it.
    known = "".join(NONCE_HALVES) + "-still-here"
    control = run_tests(
        MEMORY_SCAN % (*NONCE_HALVES, *TEST_HALVES) + f"\nKEEP = {known!r}\n",
        ["assert add(1, 2)[0] is True"],
        isolation=level,
    )
    assert control.reason == "passed", control
