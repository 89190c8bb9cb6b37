"""Time and size bounds for rendering chat templates (used by zlocal.inference.template_sandbox).

A render runs under a budget: a deadline, checked by ``tick()`` from the sandbox's hooks, and a
count of the characters built so far. Operations that can turn a small input into a huge output
(``'x' * n``, ``2 ** n``, ``s.replace('', s)``, ``'%0{n}d' % 1``, printing [x, x] nested 60 deep)
are sized here *before* they run: a single C-level step cannot be interrupted, so it must be
refused up front.
"""

from __future__ import annotations

import re
import string
import time
from collections.abc import ItemsView, KeysView, ValuesView
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from jinja2.utils import Namespace

from zlocal.errors import TemplateError

MAX_RENDER_CHARS = 4_000_000  # ~1M tokens: far above any context zlocal runs, far below a memory problem
RENDER_BUDGET_CHARS = 64 * MAX_RENDER_CHARS  # everything one render may build, intermediates included
RENDER_SECONDS = 1.0  # real templates render in milliseconds
MAX_INT_BITS = 4096  # integers in chat templates count messages; 10**10**10 is an attack
_WALK_TICK = 1 << 16  # how often a long size walk looks at the clock


class TemplateLimitError(TemplateError):
    """A chat template ran past the render time bound or tried to build an oversized value."""


@dataclass
class _Budget:
    deadline: float
    seconds: float
    chars: int = 0


# Per render, per thread: the server renders from several threads with one compiled template.
_BUDGET: ContextVar[_Budget | None] = ContextVar("zlocal_template_budget", default=None)


@contextmanager
def render_budget(seconds: float):
    """Run the enclosed render with a fresh deadline ``seconds`` away and an empty size budget."""
    token = _BUDGET.set(_Budget(deadline=time.monotonic() + seconds, seconds=seconds))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def tick() -> None:
    """Raise TemplateLimitError once the current render is past its deadline (no-op outside one)."""
    budget = _BUDGET.get()
    if budget is not None and time.monotonic() > budget.deadline:
        raise TemplateLimitError(
            f"rendering ran past its {budget.seconds:g} s limit; it loops too long for a chat template"
        )


def refuse_over(size: int, what: str) -> None:
    """Raise TemplateLimitError when ``what`` would be longer than MAX_RENDER_CHARS."""
    if size > MAX_RENDER_CHARS:
        raise TemplateLimitError(f"{what} would be ~{size:,} characters, over the {MAX_RENDER_CHARS:,} limit")


def spend(size: int, what: str) -> None:
    """Refuse one value over the size bound, and count it against this render's budget."""
    refuse_over(size, what)
    budget = _BUDGET.get()
    if budget is not None:
        budget.chars += size
        if budget.chars > RENDER_BUDGET_CHARS:
            raise TemplateLimitError(
                f"rendering built over {RENDER_BUDGET_CHARS:,} characters in total; not a chat template"
            )


def charge(value: Any, what: str = "a value") -> Any:
    """Count a built string/list against this render's budget; return it unchanged."""
    if isinstance(value, (str, list, tuple, dict)) and value:
        spend(len(value), what)
    return value


def _children(value: Any) -> list | None:
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple, KeysView, ValuesView, ItemsView)):
        return list(value)
    if isinstance(value, Namespace):  # namespace() prints its attributes
        attrs = object.__getattribute__(value, "_Namespace__attrs")
        return [*attrs.keys(), *attrs.values()]
    return None


def _is_container(value: Any) -> bool:
    if isinstance(value, (str, int, float)) or value is None:  # the common leaves, fast
        return False
    return isinstance(value, (dict, list, tuple, KeysView, ValuesView, ItemsView, Namespace))


def _leaf_weight(value: Any) -> int:
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    return 24 if isinstance(value, float) else 2


def weight(value: Any, per_item: int = 0, per_level: int = 0, limit: int = MAX_RENDER_CHARS) -> int:
    """About how many characters ``value`` prints as (str(), tojson, join), saturating past ``limit``.

    Containers are walked once each, not printed: a value that shares structure to print as
    terabytes ([x, x] nested 60 deep) costs 60 steps. ``per_item`` and ``per_level`` add the
    separator and indent cost of each element (tojson).
    """
    if not _is_container(value):
        return _leaf_weight(value) + per_item
    cap = limit + 1
    memo: dict[int, tuple[int, int, int]] = {}  # id -> (chars, elements, height), each saturated at cap
    keep, open_ids, stack, steps = [], set(), [(value, None)], 0  # keep: ids stay unique while walking
    while stack:
        item, kids = stack.pop()
        steps += 1
        if steps % _WALK_TICK == 0:
            tick()
        if kids is None:
            if id(item) in memo or id(item) in open_ids:
                continue  # shared, or a cycle (printed as "...")
            kids = _children(item) or []
            if len(kids) >= cap:
                memo[id(item)] = (cap, cap, 0)
                continue
            keep.append(kids)
            open_ids.add(id(item))
            stack.append((item, kids))
            stack.extend((kid, None) for kid in kids if _is_container(kid))
            continue
        chars, count, height = 2, 1, 0
        for kid in kids:
            c, n, h = memo.get(id(kid), (_leaf_weight(kid), 1, 0))
            chars, count, height = chars + c, count + n, max(height, h + 1)
        memo[id(item)] = (min(chars, cap), min(count, cap), min(height, cap))
        open_ids.discard(id(item))
    chars, count, height = memo[id(value)]
    return chars + count * (per_item + per_level * height)


def weigh(value: Any, what: str = "a value") -> Any:
    """Refuse ``value`` if it would print longer than the size bound; return it unchanged."""
    refuse_over(weight(value), what)
    return value


def _num(digits: str) -> int:
    return 10**18 if len(digits) > 18 else int(digits)  # int() refuses huge digit strings anyway


_PRINTF_FIELD = re.compile(r"%(\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def printf_size(fmt: str, values: Any) -> int:
    """Upper bound on ``fmt % values``: literal text, widths, precisions, the printed values."""
    if isinstance(values, dict):
        args = tuple(values.values())
    else:
        args = values if isinstance(values, tuple) else (values,)
    star = max((a for a in args if isinstance(a, int)), default=0)
    fields = list(_PRINTF_FIELD.finditer(fmt))
    if isinstance(values, dict):  # %(name)s may repeat a value
        total = len(fmt) + len(fields) * max((weight(a) for a in args), default=0)
    else:
        total = len(fmt) + sum(weight(a) for a in args)
    for m in fields:
        width = star if m.group(2) == "*" else _num(m.group(2) or "0")
        prec = star if m.group(3) == "*" else _num(m.group(3) or "0")
        total += max(width, prec)
    return total


def format_size(fmt: str, args: tuple, kwargs: dict) -> int:
    """Upper bound on ``fmt.format(*args, **kwargs)``: every field may print the biggest value."""
    values = [*args, *kwargs.values()]
    star = max((v for v in values if isinstance(v, int)), default=0)
    biggest = max((weight(v) for v in values), default=0)
    total = len(fmt)
    for _literal, field, spec, _conv in string.Formatter().parse(fmt):
        if field is not None:
            total += biggest + sum(_num(d) for d in re.findall(r"\d+", spec or ""))
            total += star if "{" in (spec or "") else 0
    return total


def replace_size(s: Any, old: Any, new: Any, count: Any = None) -> int:
    """Length of ``str(s).replace(old, new, count)``, computed without building it."""
    text = s if isinstance(s, str) else str(s)
    if not isinstance(old, str) or not isinstance(new, str):
        return len(text)
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * max(0, len(new) - len(old))


def bounded_items(items: Any, sep_len: int):
    """Yield ``items`` for a join, refusing once the joined text would pass the size bound."""
    total = 0
    for item in items:
        total += weight(item) + sep_len
        refuse_over(total, "a joined string")
        yield item


def int_or_len(value: Any) -> int:
    """A width argument's size: the int itself, or a string's length (indent accepts both)."""
    return value if isinstance(value, int) else len(value) if isinstance(value, str) else 0


def check_str_method(owner: str, name: str, args: tuple, kwargs: dict) -> tuple:
    """Size checks for the str methods that can multiply their input; returns (maybe new) args."""
    first = args[0] if args else next(iter(kwargs.values()), None)
    if name == "join" and args:
        return (bounded_items(args[0], len(owner)), *args[1:])
    if name == "replace" and len(args) >= 2:
        count = args[2] if len(args) > 2 else None
        refuse_over(replace_size(owner, args[0], args[1], count), "a replaced string")
    elif name in {"center", "ljust", "rjust", "zfill"}:
        refuse_over(int_or_len(first), "a padded string")
    elif name == "expandtabs":
        tab = first if isinstance(first, int) else 8
        refuse_over(len(owner) + owner.count("\t") * tab, "a tab-expanded string")
    elif name in {"format", "format_map"}:
        mapping = name == "format_map" and args and isinstance(args[0], dict)
        refuse_over(format_size(owner, *(((), args[0]) if mapping else (args, kwargs))), "a formatted string")
    elif name == "translate" and isinstance(first, dict):
        refuse_over(len(owner) * max((weight(v) for v in first.values()), default=1), "a translated string")
    return args


def check_binop(op: str, left: Any, right: Any) -> None:
    """Refuse ``left op right`` when it would build an oversized string, list or integer."""
    seqs = (str, list, tuple)
    if op == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateLimitError(f"an integer product would pass {MAX_INT_BITS} bits")
        elif isinstance(left, seqs) and isinstance(right, int):
            refuse_over(len(left) * right, "a repeated string or list")
        elif isinstance(right, seqs) and isinstance(left, int):
            refuse_over(len(right) * left, "a repeated string or list")
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        if right * left.bit_length() > MAX_INT_BITS:
            raise TemplateLimitError(f"an integer power would pass {MAX_INT_BITS} bits")
    elif op == "+" and isinstance(left, seqs) and isinstance(right, seqs):
        refuse_over(len(left) + len(right), "a concatenation")
    elif op == "%" and isinstance(left, str):
        refuse_over(printf_size(left, right), "a %-formatted string")
