"""What unpickling a pickle of a DCP folder would build, worked out from its opcodes
before anything is built, so that a file of megabytes (or a tensor's ``data.pkl`` of
hundreds of bytes) cannot take gigabytes or hours.

A pickle is a program, and a short one can ask for much: one byte builds an empty dict
(64 bytes); a two-byte reference to a stored object puts it anywhere again, where a call
(``REDUCE``) copies it or a dict hashes it whole, so that sharing makes the work grow as
the square of the file, or exponentially where shared objects hold shared objects (700
bytes of tuples of tuples hash for longer than the universe has existed). ``check`` runs
the opcodes over sizes instead of objects, and refuses a pickle

- with an opcode that pickle does not write for DCP's ``.metadata`` (protocol 4 or 5) or
  ``torch.save``'s ``data.pkl`` (protocol 2): sets, ``DUP``, memo slots written out of
  order, extensions, text opcodes, ints of more than 64 bits;
- that refers again to a tuple, list or dict, or to an instance before ``BUILD`` has set
  its state: these pickles share strings, classes, dtypes, sizes and whole instances
  only, so nothing changes once shared and nothing holds itself;
- with a value that reaches more objects than the file has bytes, a shared one counted
  each time it is reached (what hashing, comparing or printing the value walks);
- whose objects (64 bytes each, a string its length more), the references it copies or
  walks (8 bytes each) and its memo (16 bytes a slot) would take more than
  ``AMPLIFICATION`` times its size.
"""

from __future__ import annotations

import pickle
import struct

AMPLIFICATION = 32
"""Most bytes built per byte of pickle, as estimated here: DCP's ``.metadata`` takes 12
(Megatron-Core's) to 18 (tensor names of one character)."""
SLACK = 2**16
"""Allowance added to both limits, for the fixed part of a small checkpoint's metadata."""

_U32 = struct.Struct("<I")
_NAMES = {value[0]: name for name, value in vars(pickle).items()
          if name.isupper() and isinstance(value, bytes) and len(value) == 1}
"""Opcode names by byte, for messages."""


class PickleRefused(pickle.UnpicklingError):
    """What the pickle would do that a DCP ``.metadata`` does not, in words."""


def check(data: bytes) -> None:
    """Refuse (``PickleRefused``) the pickle ``data`` unless DCP could have written it and
    unpickling it stays within the bounds above."""
    try:
        _run(data, len(data) + SLACK, (AMPLIFICATION * len(data) + SLACK) // 8)
    except (IndexError, ValueError, struct.error):
        raise PickleRefused("its opcodes do not make a pickle (one reads past the data, "
                            "the stack or the memo)") from None


def _run(data: bytes, reach: int, work: int) -> None:
    """Run the opcodes of ``data`` up to STOP over sizes, with ``work`` references (8
    bytes; an object counts 8) to spend: each value on the stack and in the memo is the
    count of objects reached from it, negative for a tuple, list or dict (never referred
    to twice), 0 for an instance whose state is not yet set. What only refers (MEMOIZE,
    GET, MARK, ...) is paid for at STOP, from the memo and the stack left. One loop, the
    commonest opcodes first: DCP's metadata runs about one opcode for two bytes, ten
    million for 90,000 tensors."""
    stack: list[int] = []
    memo: list[int] = []
    marks: list[int] = []
    waiting: dict[int, int] = {}  # stack position -> memo slot of an instance being built
    unbuilt: dict[int, int] = {}  # memo slot -> stack position of the same
    push, store, u32 = stack.append, memo.append, _U32.unpack_from
    pos = 0
    while True:
        op = data[pos]
        pos += 1
        if op == 0x94:  # MEMOIZE
            top = stack[-1]
            if top == 0:
                _memoize_new(waiting, unbuilt, len(stack) - 1, len(memo), pos)
            store(top)
        elif op == 0x68:  # BINGET
            size = memo[data[pos]]
            push(size if size > 0 else _final(memo, data[pos], unbuilt, waiting, stack))
            pos += 1
        elif op == 0x6A:  # LONG_BINGET
            slot = u32(data, pos)[0]
            size = memo[slot]
            push(size if size > 0 else _final(memo, slot, unbuilt, waiting, stack))
            pos += 4
        elif op == 0x4B:  # BININT1
            push(1)
            pos += 1
        elif op == 0x28:  # MARK
            marks.append(len(stack))
        elif op == 0x29:  # EMPTY_TUPLE
            push(-1)
        elif op == 0x81:  # NEWOBJ: a new instance; the arguments are walked
            work -= 8 + abs(stack.pop())
            stack[-1] = 0
            waiting.pop(len(stack) - 1, None)
            if work < 0:
                break
        elif op == 0x85:  # TUPLE1
            stack[-1] = -1 - abs(stack[-1])
            work -= 9
            if work < 0:
                break
        elif op == 0x62:  # BUILD
            state = abs(stack.pop())
            if stack[-1] != 0:
                raise PickleRefused(f"it sets the state of what is not a new instance (BUILD "
                                    f"at byte {pos - 1})")
            stack[-1] = size = _within(1 + state, reach, pos)
            slot = waiting.pop(len(stack) - 1, -1)
            if slot >= 0:
                memo[slot] = size
                unbuilt.pop(slot, None)
            work -= 8
            if work < 0:
                break
        elif op == 0x75:  # SETITEMS: each key is hashed, walked whole
            start = marks.pop()
            items = stack[start:]
            del stack[start:]
            if stack[-1] >= 0 or len(items) % 2:
                raise PickleRefused(f"it sets items of what is not a dict (at byte {pos - 1})")
            stack[-1] = -_within(sum(map(abs, items)) - stack[-1], reach, pos)
            work -= 2 * len(items) + sum(map(abs, items[::2]))
            if work < 0:
                break
        elif op == 0x7D or op == 0x5D:  # EMPTY_DICT, EMPTY_LIST
            push(-1)
            work -= 8
            if work < 0:
                break
        elif op == 0x52:  # REDUCE: a call; the arguments are walked
            arguments = abs(stack.pop())
            stack[-1] = _within(1 + arguments, reach, pos)
            work -= 8 + arguments
            if work < 0:
                break
        elif op == 0x86:  # TUPLE2
            last = abs(stack.pop())
            stack[-1] = -1 - last - abs(stack[-1])
            work -= 10
            if work < 0:
                break
        elif op == 0x89 or op == 0x88 or op == 0x4E:  # NEWFALSE, NEWTRUE, NONE
            push(1)
        elif op == 0x8C or op == 0x43 or op == 0x58 or op == 0x42:  # strings, bytes
            short = op == 0x8C or op == 0x43
            length = data[pos] if short else u32(data, pos)[0]
            pos += length + (1 if short else 4)
            if pos > len(data):
                raise IndexError
            push(1)
            work -= 8 + length // 8
            if work < 0:
                break
        elif op == 0x4D or op == 0x4A or op == 0x47:  # BININT2, BININT, BINFLOAT
            pos += 2 if op == 0x4D else 4 if op == 0x4A else 8
            push(1)
            work -= 8
            if work < 0:
                break
        elif op == 0x74 or op == 0x87:  # TUPLE, TUPLE3
            start = marks.pop() if op == 0x74 else len(stack) - 3
            items = stack[start:]
            del stack[start:]
            push(-1 - sum(map(abs, items)))
            work -= 8 + len(items)
            if work < 0:
                break
        elif op == 0x61 or op == 0x73 or op == 0x65:  # APPEND, SETITEM, APPENDS
            start = marks.pop() if op == 0x65 else len(stack) - (2 if op == 0x73 else 1)
            items = stack[start:]
            del stack[start:]
            if stack[-1] >= 0 or (op == 0x73 and len(items) != 2):
                raise PickleRefused(f"it adds items to what is not a list or dict (at byte "
                                    f"{pos - 1})")
            stack[-1] = -_within(sum(map(abs, items)) - stack[-1], reach, pos)
            work -= 2 * len(items) + (abs(items[0]) if op == 0x73 else 0)
            if work < 0:
                break
        elif op == 0x93:  # STACK_GLOBAL
            del stack[-2:]
            push(1)
            work -= 8
            if work < 0:
                break
        elif op == 0x8A:  # LONG1
            if data[pos] > 8:
                raise PickleRefused(f"it holds an int of {data[pos]} bytes (at byte {pos}); "
                                    "DCP's metadata holds ints of at most 8")
            pos += 1 + data[pos]
            push(1)
            work -= 8
            if work < 0:
                break
        elif op == 0x71 or op == 0x72:  # BINPUT, LONG_BINPUT (protocol 2: torch.save)
            slot = data[pos] if op == 0x71 else u32(data, pos)[0]
            pos += 1 if op == 0x71 else 4
            if slot != len(memo):
                raise PickleRefused(f"it writes memo slot {slot} where pickle writes "
                                    f"{len(memo)} (at byte {pos})")
            top = stack[-1]
            if top == 0:
                _memoize_new(waiting, unbuilt, len(stack) - 1, len(memo), pos)
            store(top)
        elif op == 0x63:  # GLOBAL (protocol 2)
            pos = data.index(b"\n", data.index(b"\n", pos) + 1) + 1
            push(1)
            work -= 8
            if work < 0:
                break
        elif op == 0x51:  # BINPERSID (protocol 2: torch.save's storages)
            work -= 8 + abs(stack[-1])
            stack[-1] = 1
            if work < 0:
                break
        elif op == 0x95:  # FRAME
            pos += 8
        elif op == 0x80:  # PROTO
            pos += 1
        elif op == 0x2E:  # STOP
            _within(abs(stack[-1]), reach, pos)
            if work >= 2 * len(memo) + len(stack) + len(marks):
                return
            break
        else:
            raise PickleRefused(f"it holds pickle opcode {_NAMES.get(op, hex(op))} (at byte "
                                f"{pos - 1}), which DCP's metadata never holds")
    raise PickleRefused(f"building it would take more than {AMPLIFICATION} times its size "
                        f"in memory (by byte {pos})")


def _memoize_new(waiting: dict[int, int], unbuilt: dict[int, int], at: int, slot: int,
                 pos: int) -> None:
    """Note that memo ``slot`` holds the new instance at stack position ``at``, whose slot
    ``BUILD`` updates; one stored twice is refused (pickle stores an object once)."""
    if at in waiting:
        raise PickleRefused(f"it stores an instance twice in its memo (at byte {pos - 1})")
    waiting[at] = slot
    unbuilt[slot] = at


def _final(memo: list[int], slot: int, unbuilt: dict[int, int], waiting: dict[int, int],
           stack: list[int]) -> int:
    """The size of the instance in memo ``slot`` that left the stack without a state (DCP's
    ``BytesStorageMetadata`` has none), now final; refused for a tuple, list or dict, or an
    instance still on the stack waiting for its state (an instance at a position holds it
    there until a NEWOBJ there or its BUILD forgets it)."""
    at = unbuilt.pop(slot, -1)
    if memo[slot] < 0 or (waiting.get(at) == slot and at < len(stack) and stack[at] == 0):
        what = "a tuple, list or dict" if memo[slot] else "an instance before its state is set"
        raise PickleRefused(f"it refers again to {what}, which DCP's metadata never does")
    memo[slot] = 1
    return 1


def _within(size: int, reach: int, pos: int) -> int:
    """``size``, once it is known to be at most ``reach``."""
    if size > reach:
        raise PickleRefused(f"a value it builds (by byte {pos}) reaches more than {reach:,} "
                            "objects, more than its size allows")
    return size
