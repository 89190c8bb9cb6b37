"""Typed exceptions. The library raises these; only the CLI turns them into exit codes.

Every message says what went wrong and what to do about it, in one line, without a traceback.
"""

from __future__ import annotations


class ZlocalError(Exception):
    """Base class for every error zlocal raises on purpose (user-facing, actionable)."""

    exit_code = 1


class ModelNotFoundError(ZlocalError):
    """The model argument names no local directory, cached repo or alias."""

    exit_code = 2


class CheckpointError(ZlocalError):
    """A checkpoint is unreadable, corrupt, unsafe or disagrees with its config."""

    exit_code = 3


class TemplateError(ZlocalError):
    """The chat template is missing, fails to render, or has no end-of-turn token to stop on."""

    exit_code = 3


class ContextOverflowError(ZlocalError):
    """Prompt plus requested new tokens do not fit in the model's context."""

    exit_code = 4


class InvalidArgumentError(ZlocalError):
    """A parameter value is out of range or of the wrong type."""

    exit_code = 2


class BusyError(ZlocalError):
    """Another generation holds the runtime and the caller asked not to wait."""

    exit_code = 5


class PlanError(ZlocalError):
    """No loading plan fits the hardware, or a plan file is invalid."""

    exit_code = 6


class ConversionError(ZlocalError):
    """A conversion cannot start or failed; the output directory was not created."""

    exit_code = 7


class VerificationError(ZlocalError):
    """Files on disk do not match the hashes in the conversion manifest."""

    exit_code = 8


class DependencyError(ZlocalError):
    """An optional dependency needed for this feature is not installed."""

    exit_code = 9


class RuntimeClosedError(ZlocalError):
    """The Runtime was closed (``close()`` or the end of its ``with`` block); its weights are freed."""

    exit_code = 1
