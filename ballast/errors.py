"""Typed errors. Each names the release stage where bad input entered, so a failed run says where."""

from __future__ import annotations

import re

# "scheme://user:password@host": the userinfo of a URI quoted in a message (a tracking URI with
# credentials, say, echoed back by a library's error) is never printed or logged. Up to the
# last "@" of the word: SQLAlchemy (MLflow's database store) takes "/" and "@" unencoded in a
# password.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)(\S*)@")


_HOST = re.compile(r"[^:@/?#]+(:[0-9]{1,5})?")


def _hidden(info: str) -> str:
    """What stands for ``info`` (all between ``scheme://`` and the token's last ``@``)."""
    cut = min((i for i in (info.find(c) for c in "/?#") if i >= 0), default=len(info))
    if "@" in info[:cut] and cut < len(info):
        # "user@host/path?q=a@b": RFC 3986's userinfo ends at the authority's last "@"; the
        # rest goes through these rules again (its query may hold credentials of its own).
        return "***@" + _hidden(info[info.rfind("@", 0, cut) + 1 :])
    query = info.find("?")
    if (
        query >= 0
        and not any(c in info[:query] for c in "@#")
        and "=" in info[query:]
        and _HOST.fullmatch(info[:cut])
    ):
        # "host:port/path?name=a@b": the "@" is in the query, which is hidden up to it (it may
        # hold a URI with credentials, "?url=https://user:token@git..."), the host kept.
        # Only a query of name=value form counts: a password may hold "?" too.
        return f"{info[: query + 1]}***@"
    # Anything else with a ":" could be "user:password" (unencoded "/", "#", "?" and "@"
    # included, as SQLAlchemy takes them) and is hidden; "host/path#a@b" is left alone.
    if ":" in info or cut == len(info):
        return "***@"
    return f"{info}@"


def _redacted(m: re.Match[str]) -> str:
    return m.group(1) + _hidden(m.group(2))


def redact_uri_credentials(text: str) -> str:
    """``text`` with the user and password of every URI in it replaced by ``***``."""
    return _USERINFO.sub(_redacted, text)


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


class CompileError(BallastError):
    stage = "compile"


class RegistryError(BallastError):
    stage = "register"


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
    status); ``exitcodes`` every failed rank's exit code from torchrun's summary (negative: a
    signal); ``seconds`` how long the launch ran. Output lines are kept redacted.
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
        exitcodes: tuple[int, ...] = (),
    ) -> None:
        self.exitcodes = exitcodes
        self.returncode = returncode
        self.timed_out = timed_out
        self.tail = tail
        self.errors = errors
        self.root_signal = root_signal
        self.seconds = seconds
        super().__init__(message)
