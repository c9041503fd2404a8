"""``ballast data``: encrypt, decrypt, validate and prepare datasets."""

from __future__ import annotations

from pathlib import Path

import typer

from ballast.cli_shared import console, err, fail
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
    from ballast.storage import LocalStorage

    s = get_settings()
    try:
        with (
            LocalStorage().open_read(str(src)) as fin,
            storage_from_settings(dst, s).open_write(dst) as fout,
        ):
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


@data_app.command("put")
def data_put(
    src: Path = typer.Argument(..., help="Plaintext file to upload."),
    dst: str = typer.Argument(..., help="s3://bucket/key or a local path"),
    name: str = typer.Option(
        None, help="Dataset name bound into the ciphertext (default: DST's file name up to '.')."
    ),
) -> None:
    """Encrypt SRC while uploading it to DST (streamed; DST appears only when complete).

    The ciphertext is bound to the dataset name, so a copy renamed to another dataset will not
    decrypt.
    """
    from ballast.crypto import EncryptingWriter, provider_from_settings
    from ballast.ingest import dataset_identity, dataset_name_from_uri, storage_from_settings
    from ballast.storage import LocalStorage

    s = get_settings()
    try:
        dataset = name or dataset_name_from_uri(dst)
        provider = provider_from_settings(s)
        with (
            LocalStorage().open_read(str(src)) as fin,
            storage_from_settings(dst, s).open_write(dst) as fout,
            EncryptingWriter(fout, provider, dataset_identity(dataset)) as enc,
        ):
            enc.write_from(fin)
    except BallastError as exc:
        fail(exc)
    console.print(
        f"put {src} -> {dst} (dataset {dataset}, key {enc.key_id}, {enc.bytes_in:,} bytes)"
    )


@data_app.command("get")
def data_get(
    uri: str = typer.Argument(..., help="s3://bucket/key or a local path"),
    dst: Path = typer.Argument(..., help="Where the plaintext goes (written 0600)."),
    name: str = typer.Option(
        None, help="Dataset name the ciphertext is bound to (default: URI's file name up to '.')."
    ),
) -> None:
    """Download and decrypt URI to DST; DST appears only if every segment verifies."""
    from ballast.crypto import decrypt_stream, provider_from_settings
    from ballast.ingest import dataset_identity, dataset_name_from_uri, storage_from_settings
    from ballast.storage import LocalStorage

    s = get_settings()
    try:
        dataset = name or dataset_name_from_uri(uri)
        provider = provider_from_settings(s)
        with (
            storage_from_settings(uri, s).open_read(uri) as fin,
            LocalStorage().open_write(str(dst)) as fout,
        ):
            decrypt_stream(fin, fout, provider, dataset_identity(dataset))
    except BallastError as exc:
        fail(exc)
    console.print(f"got {uri} -> {dst} (dataset {dataset})")


@data_app.command("validate")
def data_validate(
    src: str = typer.Argument(..., help="Encrypted dataset: local path or s3://bucket/key"),
    name: str = typer.Option(None, help="Dataset name (spec and identity)."),
) -> None:
    """Decrypt SRC in memory and run its expectation suite."""
    from ballast.crypto import provider_from_settings
    from ballast.data import bundled_spec
    from ballast.ingest import load_validated, quarantine_path, storage_from_settings
    from ballast.validation import ExpectationsFailed

    s = get_settings()
    try:
        ds = load_validated(
            src,
            provider=provider_from_settings(s),
            spec=bundled_spec(name or s.dataset_name),
            storage=storage_from_settings(src, s),
            quarantine=quarantine_path(s),
        )
    except BallastError as exc:
        if isinstance(exc, ExpectationsFailed):
            if exc.quarantined:
                err.print(
                    f"quarantined: record appended to {quarantine_path(s)}",
                    soft_wrap=True,
                    markup=False,
                )
            else:
                err.print(
                    f"NOT quarantined: the record could not be written to {quarantine_path(s)}",
                    soft_wrap=True,
                    markup=False,
                )
        fail(exc)
    console.print(
        f"[green]valid[/]: {ds.n_rows} rows, {len(ds.checks)} expectations passed "
        f"(sha256 {ds.sha256[:12]}, ciphertext sha256 {(ds.ciphertext_sha256 or '')[:12]})"
    )


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
