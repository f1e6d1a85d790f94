"""The `tokenprio` command line: thin typer wrappers that build a config and call one plain function."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Token-priority SFT: score a corpus once, train many students.")


def fail(error: Exception) -> None:
    """Turn a user-facing error into one red line and exit code 1 (no traceback)."""
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


# ---- score / reweight ------------------------------------------------------------------------

# ---- inspect ---------------------------------------------------------------------------------

# ---- train -----------------------------------------------------------------------------------

# ---- eval / demo -----------------------------------------------------------------------------


if __name__ == "__main__":
    app()
