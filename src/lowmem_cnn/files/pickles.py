"""Reading a parameter file's pickle, a dict of NumPy arrays, without running anything
in it: a pickle can run code when it is loaded, so only the few names a pickled float
array needs are resolved, and every other is refused (read_pickle, read_params).
"""

import hashlib
import math
import re
import struct
from pathlib import Path

import numpy as np

from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.common.reading import read_regular_file, shown, shown_name

# Not with pickle.Unpickler: the few instructions a dict of NumPy arrays is pickled
# with (protocols 2 to 5, NumPy 1.x and 2.x) are carried out by _PickleMachine, which
# calls nothing the file names but the stand-ins below for NumPy's own rebuilders. It
# allocates nothing a file declares before the bytes are there: an array is a view of
# the file's own bytes (read into a bytearray), turned to native byte order in place.

# What it holds stays small: SETITEMS batches 1,000 pairs (2,000 values on the stack); a
# dict of arrays nests 4 deep; NumPy memoizes 8 objects an array and puts about 25 values
# in tuples, and a network of MAX_LAYERS layers has at most 1,024 arrays. Bytes are views
# of the file. The most a crafted file makes it hold: its memo full of views of empty
# bytes, 4.0 MiB measured (tests/test_fuzz_params.py).
_MOST_STACK = 10_000
_MOST_MARKS = 64
_MOST_MEMO = 1 << 14
_MOST_KEYS = 4096
_MOST_ITEMS = 1 << 16  # in all the tuples and lists it makes
_MOST_DIMENSIONS = 32  # NumPy's own limit is 64; parameters have at most 4
_NAME_LINE = 256  # a GLOBAL's module or name: NumPy's are 30 characters
# The array dtypes a parameter file may hold, as numpy.dtype's pickle names them: real
# floats and integers, and booleans (no complex, object, text or structured dtypes).
_SPECS = frozenset(("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"))
# numpy.dtype's state: (version, byte order, subarray, names, fields, size, alignment,
# flags); anything but the plain numbers' would make another dtype than the one checked
_BYTE_ORDERS = ("<", ">", "|", "=")
_PLAIN_STATE = (None, None, None, -1, -1, 0)


class _Refused(Exception):
    """The file asks for something a parameter file never holds."""


class _Damaged(Exception):
    """The bytes are not a whole pickle."""


class _Dtype:
    """numpy.dtype(spec, align, copy), waiting for its state (its byte order)."""

    def __init__(self, spec):
        self.spec, self.dtype = spec, None

    def build(self, state):
        if (self.dtype is not None or not isinstance(state, tuple) or len(state) != 8
                or state[0] != 3 or state[1] not in _BYTE_ORDERS or state[2:] != _PLAIN_STATE):
            raise _Refused(f"a dtype {self.spec} with the state {shown(state)}, not a plain number's")
        self.dtype = np.dtype(self.spec).newbyteorder("=" if state[1] in "|=" else state[1])


class _Array:
    """What NumPy's _reconstruct makes: an empty array, waiting for its state (version,
    shape, dtype, Fortran order, bytes)."""

    def __init__(self, machine):
        self.machine, self.array = machine, None

    def build(self, state):
        if self.array is not None or not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise _Refused(f"an array with the state {shown(state)}")
        _, shape, dtype, fortran, data = state
        if not isinstance(fortran, bool):
            raise _Refused(f"an array whose order is {shown(fortran)}")
        self.array = self.machine.array(data, dtype, shape, "F" if fortran else "C")


class _PickleMachine:
    """Carries out a pickle's instructions (see pickletools) over `data`, a bytearray."""

    def __init__(self, data: bytearray):
        self.data, self.view, self.pos = data, memoryview(data), 0
        self.frame_end = 0  # protocol 4's frames: no instruction reaches past its frame
        self.stack, self.marks, self.memo = [], [], {}
        self.items = 0  # in the tuples and lists made so far
        self.used = {}  # id -> the buffer of each array made: no two share their bytes
        self.callables = {
            ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy.core.numeric", "_frombuffer"): self._frombuffer,  # protocol 5
            ("numpy._core.numeric", "_frombuffer"): self._frombuffer,
            ("numpy", "dtype"): self._dtype,
            ("_codecs", "encode"): self._encode,  # protocol 2's bytes
            ("collections", "OrderedDict"): self._ordered_dict,
        }

    def forget(self):
        """Let go of everything but the arrays made: its memo holds _Arrays, which hold
        it, and its callables are its own bound methods: cycles that kept the file's
        bytes (989 KiB of the book's DeepConvNet, read by network_for, then by
        load_params) until the next garbage collection."""
        self.stack.clear()
        self.memo.clear()
        self.used.clear()
        self.marks.clear()
        self.callables.clear()

    # the stand-ins for what the file names

    def _reconstruct(self, subtype, shape, typecode):
        if subtype is not np.ndarray:
            raise _Refused("only plain NumPy arrays are allowed")
        # NumPy pickles an array as an empty one whose state (shape and bytes, checked
        # against each other) is set after; never any other shape here
        if shape != (0,):
            raise _Refused(f"it declares an array of shape {shown(shape)} outside its data, "
                           "which NumPy never writes")
        if not isinstance(typecode, (memoryview, bytearray)) or typecode != b"b":
            raise _Refused(f"it declares an array of type code {shown(typecode, 20)}, not NumPy's b'b'")
        return _Array(self)

    def _frombuffer(self, data, dtype, shape, order):
        if order not in ("C", "F"):
            raise _Refused(f"an array whose order is {shown(order)}")
        return self.array(data, dtype, shape, order)

    def _dtype(self, spec, align=False, copy=True):
        if align not in (False, 0) or copy not in (True, 1) or not isinstance(spec, str) or \
                spec not in _SPECS:
            named = shown(spec)
            if isinstance(spec, str) and re.fullmatch(r"[A-Za-z]\d{0,3}", spec):
                try:
                    named = str(np.dtype(spec))
                except TypeError:
                    pass
            raise _Refused(f"arrays of dtype {named} are not parameters")
        return _Dtype(spec)

    def _encode(self, text, encoding):
        if not isinstance(text, str) or encoding != "latin1":
            raise _Refused(f"it encodes {shown(text, 20)} as {shown(encoding)}, not an array's bytes")
        return bytearray(text, "latin-1")  # a character above 255: a ValueError, damaged

    def _ordered_dict(self):
        return {}

    def array(self, data, dtype, shape, order) -> np.ndarray:
        """The array `shape` of `dtype` (a _Dtype) whose bytes are `data`: a view of them,
        turned to native byte order in place."""
        if not isinstance(dtype, _Dtype) or dtype.dtype is None:
            raise _Refused(f"an array of dtype {shown(dtype)}")
        if (not isinstance(shape, tuple) or len(shape) > _MOST_DIMENSIONS
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise _Refused(f"an array of shape {shown(shape)}, not a tuple of sizes from 0")
        if not isinstance(data, (memoryview, bytearray)):
            raise _Refused(f"an array whose bytes are {shown(data, 20)}")
        if id(data) in self.used:
            raise _Refused("two arrays that share their bytes")
        dtype = dtype.dtype
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != len(data):
            raise _Refused(f"an array of shape {shown(shape)} and dtype {dtype}, which is "
                           f"{nbytes:,} bytes, with {len(data):,} bytes of data")
        self.used[id(data)] = data
        native = dtype.newbyteorder("=")
        if not nbytes:
            return np.zeros(shape, native, order=order)
        array = np.frombuffer(data, dtype)
        if not dtype.isnative:
            array = array.byteswap(inplace=True).view(native)
        return array.reshape(shape, order=order)

    # reading the instructions

    def take(self, n: int) -> memoryview:
        if n > len(self.data) - self.pos:
            raise _Damaged(f"it ends inside an instruction at byte {self.pos:,}")
        if self.pos < self.frame_end < self.pos + n:
            raise _Damaged(f"an instruction at byte {self.pos:,} goes past the end of its frame")
        self.pos += n
        return self.view[self.pos - n : self.pos]

    def number(self, form: str) -> int:
        return struct.unpack(form, self.take(struct.calcsize(form)))[0]

    def text(self, form: str) -> str:
        return str(self.take(self.number(form)), "utf-8", "surrogatepass")

    def line(self) -> str:
        end = self.data.find(b"\n", self.pos, self.pos + _NAME_LINE)
        if end < 0:
            raise _Damaged(f"a name at byte {self.pos:,} is not a line of at most {_NAME_LINE}")
        return str(self.take(end + 1 - self.pos)[:-1], "utf-8")

    def push(self, value):
        if len(self.stack) >= _MOST_STACK:
            raise _Refused(f"more than {_MOST_STACK:,} values at once")
        self.stack.append(value)

    def pop(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Damaged("an instruction has no value to take")
        return self.stack.pop()

    def pop_mark(self) -> list:
        if not self.marks:
            raise _Damaged("an instruction has no mark")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return self.counted(items)

    def counted(self, items: list) -> list:
        """`items`, to be put in a tuple, a list or the dict."""
        self.items += len(items)
        if self.items > _MOST_ITEMS:
            raise _Refused(f"more than {_MOST_ITEMS:,} values in tuples and lists")
        return items

    def find(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Damaged("a name that is not a text")
        if (module, name) not in self.callables and (module, name) != ("numpy", "ndarray"):
            raise _Refused(f"it asks to load {shown_name(module)}.{shown_name(name)}, which a "
                           "parameter file never needs (refused: a pickle can run code)")
        return self.callables.get((module, name), np.ndarray)

    def memoize(self, index):
        if len(self.memo) >= _MOST_MEMO and index not in self.memo:
            raise _Refused(f"more than {_MOST_MEMO:,} remembered values")
        if not self.stack:
            raise _Damaged("nothing to remember")
        self.memo[index] = self.stack[-1]

    def set_items(self, items: list):
        target = self.stack[-1] if self.stack else None
        if not isinstance(target, dict) or len(items) % 2:
            raise _Damaged("items set into what is not a dict")
        for key, value in zip(items[::2], items[1::2], strict=True):
            if not isinstance(key, str):
                raise _Refused(f"a key {shown(key)} that is not a text")
            if len(target) >= _MOST_KEYS and key not in target:
                raise _Refused(f"more than {_MOST_KEYS:,} keys")
            target[key] = value

    def run(self):
        """The pickled value (an _Array in it stands for its array)."""
        while True:
            code = self.take(1)[0]
            op = _OPS.get(code)
            if op is None:
                known = _known_op(code)
                if known:
                    raise _Refused(f"it uses the pickle instruction {known}, which a parameter "
                                   "file never needs (refused: a pickle can run code)")
                raise _Damaged(f"byte {self.pos - 1:,} is not a pickle instruction")
            op(self)
            if op is _stop:
                return self.stack[0]


def _reduce(m):
    args, function = m.pop(), m.pop()
    if not isinstance(args, tuple) or not any(function is f for f in m.callables.values()):
        raise _Refused(f"it calls {shown(function)}, which a parameter file never does")
    try:
        m.push(function(*args))
    except TypeError:
        raise _Refused(f"it calls NumPy's {function.__name__.lstrip('_')} with "
                       f"{len(args)} arguments") from None


def _build(m):
    state, target = m.pop(), m.pop()
    if not isinstance(target, (_Array, _Dtype)):
        raise _Refused(f"it sets the state of {shown(target)}")
    target.build(state)
    m.push(target)


def _frame(m):
    length = m.number("<Q")
    if m.pos < m.frame_end or length > len(m.data) - m.pos:
        raise _Damaged(f"a frame at byte {m.pos - 9:,} does not fit")
    m.frame_end = m.pos + length


def _stop(m):
    if len(m.stack) != 1 or m.marks:
        raise _Damaged("it stops with values left over")


def _proto(m):
    protocol = m.take(1)[0]
    if not 2 <= protocol <= 5:
        raise _Refused(f"pickle protocol {protocol}: parameter files are of protocols 2 to 5")


def _mark(m):
    if len(m.marks) >= _MOST_MARKS:
        raise _Refused(f"values nested more than {_MOST_MARKS} deep")
    m.marks.append(len(m.stack))


def _get(m, form):
    index = m.number(form)
    if index not in m.memo:
        raise _Damaged(f"it recalls value {index}, never remembered")
    m.push(m.memo[index])


def _append(m, items):
    target = m.stack[-1] if m.stack else None
    if not isinstance(target, list) or len(target) + len(items) > _MOST_STACK:
        raise _Damaged("items appended to what is not a list")
    target.extend(items)


def _tuple(n):
    return lambda m: m.push(tuple(m.counted([m.pop() for _ in range(n)][::-1])))


_OPS = {code[0]: handler for code, handler in {
    b"\x80": _proto, b"\x95": _frame,
    b".": _stop, b"(": _mark, b"}": lambda m: m.push({}), b")": lambda m: m.push(()),
    b"]": lambda m: m.push([]), b"a": lambda m: _append(m, m.counted([m.pop()])),
    b"e": lambda m: _append(m, m.pop_mark()),
    b"s": lambda m: m.set_items([*reversed([m.pop(), m.pop()])]),
    b"u": lambda m: m.set_items(m.pop_mark()),
    b"X": lambda m: m.push(m.text("<I")), b"\x8c": lambda m: m.push(m.text("<B")),
    b"\x8d": lambda m: m.push(m.text("<Q")),
    b"C": lambda m: m.push(m.take(m.number("<B"))), b"B": lambda m: m.push(m.take(m.number("<I"))),
    b"\x8e": lambda m: m.push(m.take(m.number("<Q"))), b"\x96": lambda m: m.push(m.take(m.number("<Q"))),
    b"c": lambda m: m.push(m.find(m.line(), m.line())),
    b"\x93": lambda m: m.push(m.find(*reversed([m.pop(), m.pop()]))),
    b"q": lambda m: m.memoize(m.number("<B")), b"r": lambda m: m.memoize(m.number("<I")),
    b"\x94": lambda m: m.memoize(len(m.memo)),
    b"h": lambda m: _get(m, "<B"), b"j": lambda m: _get(m, "<I"),
    b"J": lambda m: m.push(m.number("<i")), b"K": lambda m: m.push(m.number("<B")),
    b"M": lambda m: m.push(m.number("<H")), b"G": lambda m: m.push(m.number(">d")),
    b"\x8a": lambda m: m.push(int.from_bytes(m.take(m.number("<B")), "little", signed=True)),
    b"t": lambda m: m.push(tuple(m.pop_mark())), b"\x85": _tuple(1), b"\x86": _tuple(2),
    b"\x87": _tuple(3), b"R": _reduce, b"b": _build,
    b"\x89": lambda m: m.push(False), b"\x88": lambda m: m.push(True), b"N": lambda m: m.push(None),
}.items()}
def _known_op(code: int) -> str | None:
    """The name of a pickle instruction this reader does not carry out, if it is one."""
    import pickletools  # only to name what is refused

    return next((op.name for op in pickletools.opcodes if op.code.encode("latin-1")[0] == code), None)


def read_params(path: Path, max_bytes: int) -> dict:
    """The dict of arrays in a parameter file, without running anything in it.

    `max_bytes` bounds the file's size (a parameter file is about the size of its
    arrays), so that a huge file cannot break the memory budget.
    """
    return read_pickle(path, max_bytes)[0]


def read_pickle(path: Path, max_bytes: int) -> tuple[dict, str]:
    """(read_params, the SHA-256 of the file's bytes: what its description names)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise LowmemError(f"{path}: cannot read parameter file ({err.strerror})") from None
    if size > max_bytes:
        raise LowmemError(f"{path}: {size:,} bytes is far more than this network's "
                          f"parameters need (at most {max_bytes:,})")
    data = read_regular_file(path, max_bytes, "a parameter file")
    if data is None:
        raise LowmemError(f"{path}: cannot read parameter file (it is gone)")
    if not data:
        raise LowmemError(f"{path}: empty file, not a parameter file")
    digest = hashlib.sha256(data).hexdigest()  # before arrays are turned to native order
    machine = _PickleMachine(data)
    try:
        params = machine.run()
    except _Refused as err:
        raise LowmemError(f"{path}: not a usable parameter file: {err}") from None
    except (_Damaged, ValueError, struct.error) as err:  # UnicodeDecodeError is a ValueError
        raise LowmemError(f"{path}: not a parameter file, or a damaged one ({err})") from None
    finally:
        machine.forget()
    if not isinstance(params, dict):
        raise LowmemError(f"{path}: holds a {type(params).__name__}, not a dict of arrays")
    for key, value in params.items():
        if isinstance(value, _Array):
            if value.array is None:
                raise LowmemError(f"{path}: not a usable parameter file: {key} is an array "
                                  "without its data")
            params[key] = value.array
    return params, digest

