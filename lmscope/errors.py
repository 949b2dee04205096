"""One exception hierarchy for lmscope. Every error says what was wrong and how to fix it."""

from __future__ import annotations


class LmscopeError(Exception):
    """Base class of every error lmscope raises on purpose."""


class ModelNotAvailableError(LmscopeError):
    """A model is not installed or not reachable offline (the message names the install command)."""


class UnsupportedArchitectureError(LmscopeError):
    """The model's architecture has no adapter (the message lists the supported families)."""


class ModelCheckError(LmscopeError):
    """A loaded model failed the load-time checks (sites firing, decomposition adding up)."""


class SiteError(LmscopeError):
    """A site name that does not parse, or a layer or head out of range."""


class InputError(LmscopeError):
    """Bad user input: empty or too long prompts, mismatched lengths, bad options."""


class RangeError(SiteError, InputError):
    """A layer, head or token position outside what the model or the prompt has (the message gives the
    valid range). A SiteError (layers and heads are part of a site) and an InputError (bad user input)."""


class TokenError(InputError):
    """A target or foil that is not exactly one token (the message says how it splits)."""


class ResultFormatError(LmscopeError):
    """A saved result that cannot be read back."""
