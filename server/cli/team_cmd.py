"""``ota product team ...``: a product's team (people and API users), through the REST API.

Attach with ``team_cmd.attach(product_app)``. Like ``ota device ...``, every command takes
``--api-url`` / ``--token`` (or OTA_API_URL / OTA_TOKEN) and ``--product`` (or OTA_PRODUCT).
"""

from __future__ import annotations

from typing import Any

import typer

from server.cli._output import print_json
from server.cli.fleet_cmd import ApiUrl, AsJson, Product, Token, _client, _table
from server.fleet.roles import PRODUCT_SCOPES

team_app = typer.Typer(
    help="A product's team: invite or remove users, create API users with scopes.",
    no_args_is_help=True,
)

TEAM_COLUMNS = ["username", "role", "scopes", "is_programmatic"]
SCOPES_HELP = "A scope the API user gets (repeatable), e.g. devices:list. Known: " + ", ".join(
    sorted(PRODUCT_SCOPES)
)


def _rows(team: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for member in team:
        role = member.get("role")
        rows.append({**member, "role": role.get("id") if isinstance(role, dict) else ""})
    return rows


@team_app.command("list")
def team_list(product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
              as_json: bool = AsJson) -> None:
    """List the product's team members and API users."""
    with _client(api_url, token) as client:
        result = client.list_team(product)
    if as_json:
        print_json(result)
        return
    _table(_rows(result.get("team", [])), TEAM_COLUMNS)


@team_app.command("add")
def team_add(
    username: str = typer.Argument(..., help="An existing account (ota admin user ...)."),
    role: str = typer.Option("viewer", "--role",
                             help="administrator, developer, support or viewer."),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """Invite an existing user into the product's team with a role."""
    with _client(api_url, token) as client:
        result = client.invite_team_member(product, username, role)
    if as_json:
        print_json(result)
    else:
        typer.echo(f"added {username} to the team of {product} as {role}")


@team_app.command("role")
def team_role(
    username: str = typer.Argument(...),
    role: str = typer.Argument(..., help="administrator, developer, support or viewer."),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """Change a team member's role on the product."""
    with _client(api_url, token) as client:
        result = client.update_team_member(product, username, role=role)
    if as_json:
        print_json(result)
    else:
        typer.echo(f"{username} is now {role} on {product}")


@team_app.command("remove")
def team_remove(username: str, product: str = Product, api_url: str = ApiUrl,
                token: str | None = Token) -> None:
    """Take a user off the product's team (an API user is deleted with its token)."""
    with _client(api_url, token) as client:
        client.remove_team_member(product, username)
    typer.echo(f"removed {username} from the team of {product}")


@team_app.command("api-user")
def team_api_user(
    friendly_name: str = typer.Argument(..., help="What the API user is for."),
    scope: list[str] = typer.Option(..., "--scope", help=SCOPES_HELP),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """Create an API user limited to the product and these scopes; prints its token once."""
    with _client(api_url, token) as client:
        result = client.create_api_user(product, friendly_name, list(scope))
    _print_api_user(result.get("created", {}), as_json)


@team_app.command("scopes")
def team_scopes(
    username: str = typer.Argument(..., help="The API user's user name."),
    scope: list[str] = typer.Option(..., "--scope", help=SCOPES_HELP),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """Replace an API user's scopes; prints its new token (the old one stops working)."""
    with _client(api_url, token) as client:
        result = client.update_team_member(product, username, scopes=list(scope))
    _print_api_user(result.get("updated", {}), as_json)


def _print_api_user(created: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(created)
        return
    tokens = created.get("tokens") or [{}]
    typer.echo(f"API user {created.get('username')} ({', '.join(created.get('scopes', []))})")
    typer.echo(f"token (shown once): {tokens[0].get('token')}")


def attach(product_app: typer.Typer) -> None:
    """Add ``team`` to ``ota product``."""
    product_app.add_typer(team_app, name="team")
