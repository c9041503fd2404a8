"""Typed errors: what their messages may carry."""

from __future__ import annotations

import pytest

from ballast.errors import BallastError, RegistryError, redact_uri_credentials


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (
            "API request to http://alice:s3cretPW@127.0.0.1:9/api/2.0/x failed",
            "API request to http://***@127.0.0.1:9/api/2.0/x failed",
        ),
        ("s3://key:secret@bucket/a and https://u@h/p", "s3://***@bucket/a and https://***@h/p"),
        (
            "postgresql+psycopg://ballast:pw@db:5432/mlflow",
            "postgresql+psycopg://***@db:5432/mlflow",
        ),
        ("http://127.0.0.1:5000/api and mail me@example.com", None),  # nothing to hide
        # Unencoded "/" and "@" in a password, as SQLAlchemy takes them (review finding).
        ("postgresql://ballast:s3cr/et@db:5432/m", "postgresql://***@db:5432/m"),
        ("postgresql://ballast:p@ss@db:5432/m", "postgresql://***@db:5432/m"),
        ("see http://corp.example/?q=a@b", "see http://corp.example/?***@b"),  # no userinfo
        ("see http://corp.example/a#q@b", None),  # nor in a fragment, without a ":"
        # A token as the user, and an "@" in the query after it (review finding)
        (
            "https://ghp_TOKEN@github.com/org/repo?ref=a@b",
            "https://***@github.com/org/repo?***@b",
        ),
        # nor with a port before it: the host stays, the query up to the "@" is hidden (it
        # may hold a URI with credentials of its own)
        ("see http://h:5000?owner=a@b", "see http://***@b"),  # or a password "5000?owner=a"
        (
            "fetch http://proxy:8080/f?url=https://deploy:ghp_S3CRET@git.example/r.git failed",
            "fetch http://proxy:8080/f?***@git.example/r.git failed",
        ),
        (
            "GET http://gw:8000/?next=postgresql://ballast:hunter2@db:5432/mlflow",
            "GET http://gw:8000/?***@db:5432/mlflow",
        ),
        ("http://u:pw@h:5000/x?owner=a@b", "http://***@b"),  # credentials too: all hidden
        # Passwords holding "@" then "/", "?" or "#", or digits then a query (second review)
        ("postgresql://ballast:p@ss/word@db:5432/m", "postgresql://***@db:5432/m"),
        ("postgresql://ballast:p@ss?word@db:5432/m", "postgresql://***@db:5432/m"),
        ("postgresql://ballast:p@ss#word@db:5432/m", "postgresql://***@db:5432/m"),
        ("redis://default:hunter2@/x@cache:6379/0", "redis://***@cache:6379/0"),
        ("postgresql://ballast:2024?x=Winter@db:5432/m", "postgresql://***@db:5432/m"),
        ("postgresql://ballast:12/hunter2?k=v@db:5432/m", "postgresql://***@db:5432/m"),
        ("https://ghp_Pm?Pm@db:1?ref=a@b", "https://***@b"),  # a token holding a "?"
        ("s3://tok?en@db/c?url=https://alice@h:1?q", "s3://***@h:1?q"),
        # a scheme right after "_" or a digit is still a scheme
        (
            "DB_postgresql://ballast:pw@db/m and 1redis://u:pw@c",
            "DB_postgresql://***@db/m and 1redis://***@c",
        ),
        # Passwords that look like a port and a query or fragment (review findings)
        ("http://user:s3cr/et?x@h:1/", "http://***@h:1/"),
        ("postgresql://ballast:2024#Winter@db:5432/m", "postgresql://***@db:5432/m"),
        ("redis://default:123?abc@cache:6379/0", "redis://***@cache:6379/0"),
        ("http://h:5000/x/y#me@z", "http://***@z"),  # an "@" in a fragment: hidden
        ("http://h:5000/a@b/c", "http://***@b/c"),  # an "@" in a path: cannot tell, hidden
    ],
)
def test_redact_uri_credentials(text: str, want: str | None) -> None:
    assert redact_uri_credentials(text) == (text if want is None else want)


def test_an_error_never_carries_uri_credentials() -> None:
    # Before: MLflow's connection errors quoted the tracking URI, password included, and the
    # CLI printed them.
    exc = RegistryError("reading versions: API request to http://alice:s3cretPW@h:9/api failed")
    assert "s3cretPW" not in str(exc) and "s3cretPW" not in exc.message
    assert "http://***@h:9/api" in exc.message
    assert str(BallastError("plain", stage="fetch")) == "[fetch] plain"


def test_every_typed_error_survives_a_pickle_round_trip_as_it_was() -> None:
    # Prefect pickles task errors; before, the stage prefix doubled ("[fetch] [fetch] ..."),
    # a stage given at raise time fell back to the class's, and FetchError.transient was lost.
    import pickle

    import ballast.errors as errors

    classes = [
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, BallastError) and c.__module__ == errors.__name__
    ]
    assert len(classes) > 10
    for cls in classes:
        exc = cls("s3://b/k: no such object")
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is cls
        assert (str(again), again.message, again.stage) == (str(exc), exc.message, exc.stage)
    store = pickle.loads(pickle.dumps(BallastError("x: put_object failed", stage="store")))
    assert (str(store), store.stage) == ("[store] x: put_object failed", "store")
    fetch = pickle.loads(pickle.dumps(errors.FetchError("gone", transient=False)))
    assert fetch.transient is False and str(fetch) == "[fetch] gone"
