"""Typed errors. Each names the release stage where bad input entered, so a failed run says where."""

from __future__ import annotations

import re
from typing import Any

# "scheme://user:password@host": the userinfo of a URI quoted in a message (a tracking URI with
# credentials, say, echoed back by a library's error) is never printed or logged. Up to the
# last "@" of the word: SQLAlchemy (MLflow's database store) takes "/" and "@" unencoded in a
# password.
# No word boundary before the scheme: "DB_postgresql://u:pw@db" holds one too.
_USERINFO = re.compile(r"(?i)([a-z][a-z0-9+.-]{0,31}://)(\S*)@")
_WORD = re.compile(r"\S+")


_HOST = re.compile(r"[^:@/?#]+(:[0-9]{1,5})?")


def _hidden(info: str) -> str:
    """What stands for ``info`` (all between ``scheme://`` and the token's last ``@``)."""
    cut = min((i for i in (info.find(c) for c in "/?#") if i >= 0), default=len(info))
    if "@" in info[:cut] and ":" not in info[:cut] and cut < len(info):
        # "token@host/path?q=a@b": RFC 3986's userinfo ends at the authority's last "@"; the
        # rest goes through these rules again (its query may hold credentials of its own).
        # Not with a ":" before the cut: "user:p@ss/word@db" is a password holding "@" and "/".
        return "***@" + _hidden(info[info.rfind("@", 0, cut) + 1 :])
    query = info.find("?")
    nested = info.find("://", query) if query >= 0 else -1
    if (
        query >= 0
        and not any(c in info[:query] for c in "@#")
        # an "@" in the query before any URI in it: "tok?en@db/?url=...": credentials
        and "@" not in info[query : nested if nested >= 0 else len(info)]
        and "=" in info[query:]
        and _HOST.fullmatch(info[:cut])
        and (":" not in info or "://" in info[query:])
    ):
        # "host/path?name=a@b" or "host:port/path?url=https://user:token@git...": the "@" is
        # in the query, which is hidden up to it (it may hold a URI with credentials), the
        # host kept. Only a query of name=value form counts, and with a ":" anywhere only one
        # that holds a URI: "user:2024?x=Winter@db" and "tok?en@db:1?a=b" are credentials.
        return f"{info[: query + 1]}***@"
    # Anything else with a ":" could be "user:password" (unencoded "/", "#", "?" and "@"
    # included, as SQLAlchemy takes them) and is hidden; "host/path#a@b" is left alone.
    if ":" in info or cut == len(info):
        return "***@"
    return f"{info}@"


def _redacted(m: re.Match[str]) -> str:
    return m.group(1) + _hidden(m.group(2))


def _redacted_word(m: re.Match[str]) -> str:
    word = m.group(0)
    if "://" not in word or "@" not in word:
        return word
    # Only up to the word's last "@", where every userinfo ends: each scan then ends at the
    # first "scheme://" (linear time; the whole word made long lines quadratic).
    end = word.rfind("@") + 1
    return _USERINFO.sub(_redacted, word[:end]) + word[end:]


def redact_uri_credentials(text: str) -> str:
    """``text`` with the user and password of every URI in it replaced by ``***``."""
    if "@" not in text or "://" not in text:
        return text
    return _WORD.sub(_redacted_word, text)


class RedactedCause(Exception):
    """Stands in, as ``__cause__``, for a library's exception whose message may hold a URI with
    credentials (MLflow's say "API request to http://user:password@host/... failed")."""


def redacted_cause(exc: BaseException) -> RedactedCause:
    """``exc`` as its type's name and its message with URI credentials hidden, keeping its
    traceback (where it was raised) and dropping its own causes (their messages may hold the
    same URI). Use as ``raise BallastError(...) from redacted_cause(exc)``: a logged traceback
    (Prefect logs a failed task's with its causes) then shows no password."""
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return RedactedCause(f"{name}: {redact_uri_credentials(str(exc))}").with_traceback(
        exc.__traceback__
    )


class BallastError(Exception):
    """Base class. ``stage`` is the release stage that refused the input. URI credentials in
    the message are redacted (:func:`redact_uri_credentials`)."""

    stage: str = "ballast"

    def __init__(self, message: str, *, stage: str | None = None) -> None:
        if stage is not None:
            self.stage = stage
        message = redact_uri_credentials(message)
        self.message = message
        super().__init__(f"[{self.stage}] {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect pickles task errors. Exceptions pickle as cls(*args), which fed the formatted
        # "[stage] message" back through __init__ ("[fetch] [fetch] ..."), lost a stage given
        # at raise time and any subclass's own fields (FetchError.transient): rebuild as is.
        return (_rebuild, (type(self), self.args), dict(self.__dict__))


def _rebuild(cls: type[BallastError], args: tuple[Any, ...]) -> BallastError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    return exc


class ConfigError(BallastError):
    stage = "config"


class FetchError(BallastError):
    """The dataset could not be read from storage. ``transient``: a retry may succeed (a read
    cut off, a server error); False when the object is missing or access is denied."""

    stage = "fetch"

    def __init__(self, message: str, *, stage: str | None = None, transient: bool = True) -> None:
        super().__init__(message, stage=stage)
        self.transient = transient


class DecryptionError(BallastError):
    """Wrong key, tampered or truncated ciphertext, or an object decrypted under another name."""

    stage = "decrypt"


class KeyServiceUnavailable(BallastError):
    """The key service (KMS) could not be reached, timed out, throttled us or failed inside:
    nothing is known about the data, and a retry may succeed (``transient``). Not a
    :class:`DecryptionError`, which says the data or its key is bad."""

    stage = "decrypt"
    transient = True


class KeyNotFoundError(DecryptionError):
    """The key id in a header is not in the key provider (unknown or retired)."""


class ValidationFailed(BallastError):
    """The dataset failed its expectation suite; ``failures`` lists what broke."""

    stage = "validate"

    def __init__(self, message: str, failures: list[str] | None = None) -> None:
        self.failures = failures or []
        detail = "; ".join(self.failures[:8])
        super().__init__(f"{message}: {detail}" if detail else message)


class TrainingError(BallastError):
    stage = "train"


class ParityError(BallastError):
    """The compiled artefact does not match eager PyTorch within tolerance."""

    stage = "compile"


class QualityGateFailed(BallastError):
    """The candidate is worse than the champion beyond tolerance, or below the absolute floor.

    ``decision`` is the :class:`ballast.quality.QualityDecision` with the evidence.
    """

    stage = "quality"

    def __init__(self, message: str, decision: object | None = None) -> None:
        self.decision = decision
        super().__init__(message)


class CostGateFailed(BallastError):
    """The candidate costs more to serve than the champion beyond the limit
    (``BALLAST_COST_MAX_RATIO``), measured side by side. ``decision`` is the
    :class:`ballast.cost.CostDecision` with the ratios.
    """

    stage = "cost"

    def __init__(self, message: str, decision: object | None = None) -> None:
        self.decision = decision
        super().__init__(message)


class CompileError(BallastError):
    stage = "compile"


class RegistryError(BallastError):
    stage = "register"


class ChampionChanged(RegistryError):
    """The champion is no longer the version a decision was made about (the watchdog's
    rollback after a promotion): nothing was changed."""


class RegistryUnreachable(RegistryError):
    """Nothing answers at the tracking server's address (found by a quick probe, before any
    registry call): said as the registry's problem, not a registration's."""

    stage = "registry"


class IntegrityError(BallastError):
    """An artefact's hash or signed manifest does not verify."""

    stage = "verify"


class ApprovalRejected(BallastError):
    stage = "approve"


class GatewayError(BallastError):
    stage = "canary"


class TrialInForce(BallastError):
    """A canary or shadow trial is in force: the release flow owns the deployment."""

    stage = "rollback"


class DistributedTrainingError(TrainingError):
    """A data-parallel training launch failed: a rank exited non-zero or was killed, or the job ran
    past its timeout. Every rank has been stopped by the time this is raised.

    ``returncode`` is torchrun's exit status (None after a timeout); ``tail`` the last output
    lines; ``errors`` the first error-looking lines (the cause is usually among them);
    ``root_signal`` the signal that killed the first rank to fail (None: it exited with a
    status); ``failures`` every failed rank's (exit code, pid) from torchrun's summary (a
    negative code: a signal), ``exitcodes`` their codes; ``terminated`` the pids torchrun
    itself sent SIGTERM; ``seconds`` how long the launch ran. Output lines are kept redacted.
    """

    def __init__(
        self,
        message: str,
        *,
        returncode: int | None = None,
        timed_out: bool = False,
        tail: tuple[str, ...] = (),
        errors: tuple[str, ...] = (),
        root_signal: int | None = None,
        seconds: float | None = None,
        failures: tuple[tuple[int, int | None], ...] = (),
        terminated: frozenset[int] = frozenset(),
    ) -> None:
        self.failures = failures
        self.terminated = terminated
        self.returncode = returncode
        self.timed_out = timed_out
        self.tail = tail
        self.errors = errors
        self.root_signal = root_signal
        self.seconds = seconds
        super().__init__(message)

    @property
    def exitcodes(self) -> tuple[int, ...]:
        return tuple(code for code, _ in self.failures)
