"""``ballast data``: encrypt, decrypt, validate and prepare datasets."""

from __future__ import annotations

from pathlib import Path

import typer

from ballast.cli_shared import console, fail
from ballast.errors import BallastError
from ballast.settings import Settings, get_settings

data_app = typer.Typer(help="Encrypt, decrypt and validate datasets.", no_args_is_help=True)


def _identity(name: str | None) -> str:
    from ballast.ingest import dataset_identity

    return dataset_identity(name or get_settings().dataset_name)


@data_app.command("encrypt")
def data_encrypt(
    src: Path,
    dst: str = typer.Argument(..., help="Local path or s3://bucket/key"),
    name: str = typer.Option(None, help="Dataset name bound into the ciphertext."),
) -> None:
    """Encrypt SRC (AES-256-GCM envelope, streamed) to DST."""
    from ballast.crypto import encrypt_stream, provider_from_settings
    from ballast.ingest import storage_from_settings

    s = get_settings()
    try:
        with open(src, "rb") as fin, storage_from_settings(dst, s).open_write(dst) as fout:
            key_id = encrypt_stream(fin, fout, provider_from_settings(s), _identity(name))
    except BallastError as exc:
        fail(exc)
    console.print(f"encrypted {src} -> {dst} (key {key_id})")


@data_app.command("decrypt")
def data_decrypt(
    src: str = typer.Argument(..., help="Local path or s3://bucket/key"),
    dst: Path = typer.Argument(...),
    name: str = typer.Option(None, help="Dataset name the ciphertext is bound to."),
) -> None:
    """Decrypt SRC to DST; DST appears only if every segment verifies."""
    from ballast.crypto import decrypt_stream, provider_from_settings
    from ballast.ingest import storage_from_settings

    s = get_settings()
    try:
        with (
            storage_from_settings(src, s).open_read(src) as fin,
            storage_from_settings(str(dst), s).open_write(str(dst)) as fout,
        ):
            decrypt_stream(fin, fout, provider_from_settings(s), _identity(name))
    except BallastError as exc:
        fail(exc)
    console.print(f"decrypted {src} -> {dst}")


@data_app.command("validate")
def data_validate(
    src: str = typer.Argument(..., help="Encrypted dataset: local path or s3://bucket/key"),
    name: str = typer.Option(None, help="Dataset name (spec and identity)."),
) -> None:
    """Decrypt SRC in memory and run its expectation suite."""
    from ballast.crypto import provider_from_settings
    from ballast.data import bundled_spec
    from ballast.ingest import load_validated, storage_from_settings

    s = get_settings()
    try:
        ds = load_validated(
            src,
            provider=provider_from_settings(s),
            spec=bundled_spec(name or s.dataset_name),
            storage=storage_from_settings(src, s),
        )
    except BallastError as exc:
        fail(exc)
    console.print(f"[green]valid[/]: {ds.n_rows} rows, {len(ds.checks)} expectations passed")


@data_app.command("prepare")
def data_prepare(dst: str = typer.Argument(None, help="Default: the state folder.")) -> None:
    """Encrypt the bundled public dataset (scikit-learn's breast-cancer data) for the release flow."""
    prepare_dataset(get_settings(), dst)


def prepare_dataset(s: Settings, dst: str | None = None) -> str:
    import io

    from ballast.crypto import encrypt_stream, provider_from_settings
    from ballast.data import bundled_csv_bytes
    from ballast.ingest import storage_from_settings

    uri = dst or s.default_dataset_uri
    with storage_from_settings(uri, s).open_write(uri) as fout:
        key_id = encrypt_stream(
            io.BytesIO(bundled_csv_bytes()), fout, provider_from_settings(s), _identity(None)
        )
    console.print(f"encrypted bundled dataset -> {uri} (key {key_id})")
    return uri
