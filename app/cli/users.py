"""`odpo users add|remove|list|rehash`: the sign-in accounts (app/services/accounts.py).

Passwords are asked for twice at a terminal, or read from stdin (`--password-stdin`, for scripts),
never taken as an argument: argv is visible to every user of the machine (`ps`).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from odpo.app.config import CommonConfig
from odpo.app.services.accounts import USERS_FILE_NAME, load_users
from odpo.app.services.users_file import add_user, rehash, remove_user

_FILE = click.option("--file", "path", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help=f"The users file. [default: {USERS_FILE_NAME} in the data directory]")


def _path(cfg: CommonConfig, path: Optional[Path]) -> Path:
    if path is not None:
        return path
    cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return cfg.data_dir / USERS_FILE_NAME


@click.group()
def users() -> None:
    """Sign-in accounts: who may label, and who may administer."""


@users.command("add")
@click.argument("name")
@click.option("--admin", is_flag=True, help="May use the Admin tab (roll back, pause, export, guidelines).")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@_FILE
@click.pass_obj
def users_add(cfg: CommonConfig, name: str, admin: bool, password_stdin: bool, path: Optional[Path]) -> None:
    """Add NAME, or give NAME a new password (and role)."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt(f"password for {name}", hide_input=True, confirmation_prompt=True)
    target = _path(cfg, path)
    new = add_user(target, name, password, admin=admin)
    role = "admin" if admin else "labeler"
    click.echo(f"{'added' if new else 'updated'} {name} ({role}) in {target}")


@users.command("remove")
@click.argument("name")
@_FILE
@click.pass_obj
def users_remove(cfg: CommonConfig, name: str, path: Optional[Path]) -> None:
    """Remove NAME (their labels stay)."""
    target = _path(cfg, path)
    remove_user(target, name)
    click.echo(f"removed {name} from {target}")


@users.command("list")
@_FILE
@click.pass_obj
def users_list(cfg: CommonConfig, path: Optional[Path]) -> None:
    """The accounts and their roles (never their hashes)."""
    for user in load_users(_path(cfg, path)):
        click.echo(f"{user.name}{'  (admin)' if user.admin else ''}")


@users.command("rehash")
@_FILE
@click.pass_obj
def users_rehash(cfg: CommonConfig, path: Optional[Path]) -> None:
    """Replace plain passwords in the file with salted scrypt hashes."""
    target = _path(cfg, path)
    converted = rehash(target)
    click.echo(f"hashed the passwords of {', '.join(converted)} in {target}" if converted
               else f"no plain passwords in {target}")
