"""Typed errors. Each names the release stage where bad input entered, so a failed run says where."""

from __future__ import annotations

import re

# "scheme://user:password@host": the userinfo of a URI quoted in a message (a tracking URI with
# credentials, say, echoed back by a library's error) is never printed or logged. Up to the
# last "@" of the word: SQLAlchemy (MLflow's database store) takes "/" and "@" unencoded in a
# password.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)(\S*)@")


_HOST_PORT = re.compile(r"[^:@/?#]+:[0-9]{1,5}")


def _redacted(m: re.Match[str]) -> str:
    info = m.group(2)
    # "host/path?q=a@b" is no userinfo (no ":", a path before the "@"): left alone. Anything
    # with a ":" could be "user:password" (unencoded "/" and "@" included, as SQLAlchemy takes
    # them) and is hidden, except "host:port" followed by a query or fragment holding the "@"
    # ("http://h:5000/x?owner=a@b"): hiding that hid the host, and a password that is digits
    # followed by "?" is not worth it.
    authority = re.split(r"[/?#]", info, maxsplit=1)[0]
    query = re.search(r"[?#]", info)
    if query is not None and "@" not in info[: query.start()] and _HOST_PORT.fullmatch(authority):
        return m.group(0)
    if ":" in info or not any(c in info for c in "/?#"):
        return f"{m.group(1)}***@"
    return m.group(0)


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
    status); ``seconds`` how long the launch ran.
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
    ) -> None:
        self.returncode = returncode
        self.timed_out = timed_out
        self.tail = tail
        self.errors = errors
        self.root_signal = root_signal
        self.seconds = seconds
        super().__init__(message)
