"""Bounded chat-template rendering.

Chat templates ship with checkpoints, so they are untrusted code. transformers renders them in
Jinja's ImmutableSandboxedEnvironment, which blocks attribute tricks but not a template that loops
for hours (nested ``range(100000)`` loops) or asks for 100 GB (``'x' * 10**11``). This module
renders them with the same setup as ``tokenizer.apply_chat_template`` (whitespace rules,
extensions, globals, the ``tojson`` filter), so real templates give the same text, plus the
bounds of zlocal.inference.template_limits:

- a deadline, checked on every loop iteration, call, attribute access, filter, test and output;
- a size bound: an operation that would build a string or list longer than MAX_RENDER_CHARS
  (``*``, ``+``, ``**``, ``%``, ``~``, join, replace, padding, format widths, tojson indent,
  printing or comparing a value) is refused before it runs; everything built or printed counts
  against a per-render budget, and the prompt itself is capped at MAX_RENDER_CHARS.

For loops, ``~`` and comparisons have no sandbox hook, so the parsed template is rewritten to route
them through helper filters (zlocal_iter, zlocal_concat, zlocal_weigh) before it is compiled.
"""

from __future__ import annotations

import inspect
import json
from datetime import datetime
from functools import lru_cache, wraps
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.exceptions import TemplateError as JinjaTemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from zlocal.inference.template_limits import (
    MAX_RENDER_CHARS,
    RENDER_SECONDS,
    TemplateLimitError,
    bounded_items,
    charge,
    check_binop,
    check_str_method,
    int_or_len,
    printf_size,
    refuse_over,
    render_budget,
    replace_size,
    spend,
    tick,
    weigh,
    weight,
)

__all__ = ["MAX_RENDER_CHARS", "RENDER_SECONDS", "TemplateLimitError", "compile_template", "render_template"]


# -- filters and tests ---------------------------------------------------------------------------
def _filter_checks() -> dict:
    """Per-filter size checks on the bound arguments (named as in jinja2.filters)."""

    def join(a):
        a["value"] = bounded_items(a["value"], len(str(a["d"])))

    def indent(a):
        s = str(a["s"])
        refuse_over(len(s) + (s.count("\n") + 1) * int_or_len(a["width"]), "an indented string")

    def wordwrap(a):
        s, line = str(a["s"]), a["width"] if isinstance(a["width"], int) and a["width"] > 0 else 1
        refuse_over(len(s) + (len(s) // line + 1) * int_or_len(a["wrapstring"] or "\n"), "a wrapped string")

    def replace(a):
        refuse_over(replace_size(a["s"], a["old"], a["new"], a["count"]), "a replaced string")

    def format_(a):
        refuse_over(printf_size(str(a["value"]), a["kwargs"] or a["args"]), "a formatted string")

    def sum_(a):
        if not isinstance(a["start"], (int, float)):  # sum(start=[]) concatenates quadratically
            raise TemplateLimitError("the sum filter's start must be a number")

    return {
        "join": join,
        "indent": indent,
        "wordwrap": wordwrap,
        "sum": sum_,
        "replace": replace,
        "format": format_,
        "center": lambda a: refuse_over(int_or_len(a["width"]), "a centered string"),
        "batch": lambda a: refuse_over(int_or_len(a["linecount"]), "a batch"),
        "slice": lambda a: refuse_over(int_or_len(a["slices"]), "a slice count"),
    }


# Filters that only look at a container's shape: weighing their input on every call would cost
# more than they do (``messages|length`` inside a loop over messages).
_UNWEIGHED = {
    "length", "count", "first", "last", "default", "d", "attr", "items", "list", "reverse", "map",
    "select", "reject", "selectattr", "rejectattr", "batch", "slice", "random", "abs", "round",
    "int", "float", "filesizeformat",
}  # fmt: skip
_COMPARING_TESTS = {
    "eq", "equalto", "==", "!=", "ne", "in", "lt", "le", "gt", "ge", "<", "<=", ">", ">=", "lessthan",
    "greaterthan",
}  # fmt: skip


def _guard(func, check=None, weigh_args: bool = True):
    """Wrap a filter or test: deadline, input size, a per-filter check, and budget on the result."""
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # context/env comes first
    signature = inspect.signature(func) if check else None

    @wraps(func)  # keeps jinja_pass_arg, so Jinja still passes the context
    def guarded(*args, **kwargs):
        tick()
        if weigh_args:
            for value in (*args[skip:], *kwargs.values()):
                weigh(value, "a filter argument")
        if signature is not None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            check(bound.arguments)
            args, kwargs = bound.args, bound.kwargs
        return charge(func(*args, **kwargs), "a filter result")

    return guarded


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson filter (json.dumps, no HTML escaping), refused when oversized."""
    step = int_or_len(indent)
    seps = 2
    if isinstance(separators, (list, tuple)):
        seps = sum(len(s) for s in separators if isinstance(s, str))
    refuse_over(weight(x, per_item=seps + (1 if step else 0), per_level=step), "tojson output")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _iter_filter(iterable):
    """Every for loop iterates through this, so loops with no other hook still see the deadline."""
    for item in iterable:
        tick()
        yield item


def _concat_filter(parts):
    """``a ~ b``: Jinja's str_join, refused before joining oversized parts."""
    return charge("".join(map(str, bounded_items(parts, 0))), "a ~ result")


# -- the environment ------------------------------------------------------------------------------
class _GenerationTag(Extension):
    """transformers' ``{% generation %}`` block (marks assistant text for training masks): rendered
    unchanged, in a call block so variable scoping matches transformers'."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox with every hook checking the deadline and sizing its inputs."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator, left, right):
        tick()
        check_binop(operator, left, right)
        return charge(super().call_binop(context, operator, left, right), "an operator result")

    def call(self, context, obj, /, *args, **kwargs):  # positional-only: templates may pass obj=
        tick()
        for value in (*args, *kwargs.values()):
            weigh(value, "a call argument")
        target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            args = check_str_method(owner, getattr(target, "__name__", ""), args, kwargs)
        return charge(super().call(context, obj, *args, **kwargs), "a call result")

    def getattr(self, obj, attribute):
        tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        tick()
        if isinstance(argument, tuple):  # hashing a tuple walks it
            weigh(argument, "a lookup key")
        return super().getitem(obj, argument)


def _raise_exception(message):
    raise JinjaTemplateError(message)


def _strftime_now(fmt):
    if len(str(fmt)) > 256:  # strftime grows its buffer up to 256x the format's length
        raise TemplateLimitError("strftime_now's format is over 256 characters")
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """transformers' ``dict`` global: builds dicts without exposing the dict type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """transformers' ``namespace`` global: no underscore attributes (no path to CPython internals)."""

    def __init__(*args, **kwargs):  # Namespace's signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore attributes on a namespace: {name!r}")


def _finalize(value):
    """Every ``{{ expression }}`` passes here: printing is where a small value turns huge."""
    tick()
    spend(weight(value), "a printed value")
    return value


@lru_cache(maxsize=1)
def _environment() -> _BoundedEnvironment:
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols], finalize=_finalize
    )
    del env.globals["lipsum"]  # lipsum(10**6) builds megabytes in one call; no chat template uses it
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    env.globals.update(dict=_TemplateDict(), namespace=_TemplateNamespace)
    env.filters["tojson"] = _tojson
    checks = _filter_checks()
    for name, func in list(env.filters.items()):
        env.filters[name] = _guard(func, checks.get(name), name not in _UNWEIGHED)
    for name, func in list(env.tests.items()):
        env.tests[name] = _guard(func, None, name in _COMPARING_TESTS)
    # The helpers _RouteThroughHelpers inserts do their own checks (and are on every loop and ~).
    env.filters.update(
        zlocal_iter=_iter_filter,
        zlocal_concat=_concat_filter,
        zlocal_weigh=lambda value: weigh(value, "a compared value"),
    )
    return env


class _RouteThroughHelpers(NodeTransformer):
    """Rewrite for loops, ``~`` and comparisons to go through the bounded helper filters."""

    @staticmethod
    def _helper(name, node):
        return nodes.Filter(node, name, [], [], None, None).set_lineno(node.lineno or 1)

    def visit_For(self, node):
        self.generic_visit(node)
        node.iter = self._helper("zlocal_iter", node.iter)
        return node

    def visit_Concat(self, node):
        self.generic_visit(node)
        return self._helper("zlocal_concat", nodes.List(node.nodes).set_lineno(node.lineno or 1))

    def visit_Compare(self, node):  # == on values built to share structure walks all of it
        self.generic_visit(node)
        node.expr = self._helper("zlocal_weigh", node.expr)
        for op in node.ops:
            op.expr = self._helper("zlocal_weigh", op.expr)
        return node


@lru_cache(maxsize=32)
def compile_template(source: str):
    """Compile a chat template in the bounded sandbox (cached by source, like transformers)."""
    env = _environment()
    ast = _RouteThroughHelpers().visit(env.parse(source))
    ast.set_environment(env)
    return env.from_string(ast)


def render_template(source: str, context: dict[str, Any], seconds: float = RENDER_SECONDS) -> str:
    """Render ``source`` with ``context`` within ``seconds`` and MAX_RENDER_CHARS of output.

    Raises TemplateLimitError past a bound; Jinja's own errors (syntax, raise_exception, sandbox
    violations) propagate unchanged for the caller to word.
    """
    template = compile_template(source)
    with render_budget(seconds):
        parts, total = [], 0
        for chunk in template.generate(**context):
            total += len(chunk)
            refuse_over(total, "the rendered prompt")
            tick()
            parts.append(chunk)
        return "".join(parts)
