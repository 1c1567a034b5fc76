"""What every built-in delegate does the same way: parse its config model with an error that
names the network and the key, and run DEL's steps best effort."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from cnispec.errors import InvalidConfig, PlexusError
from delegates.plugin import PluginRequest

ConfT = TypeVar("ConfT", bound=BaseModel)


def parse(model: type[ConfT], req: PluginRequest) -> ConfT:
    """The request's config as `model` (pure: no kernel lookups); InvalidConfig names the key.
    A config asking for `linkInContainer` is refused: no built-in supports it."""
    try:
        conf = model.model_validate(dict(req.config))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        where = f"{where}: " if where else ""
        raise InvalidConfig(f"network {req.network_name}: {where}{first['msg']}") from None
    if getattr(conf, "link_in_container", False):
        raise InvalidConfig(f"network {req.network_name}: linkInContainer is not supported")
    return conf


def best_effort(req: PluginRequest, *steps: Callable[[], Any]) -> None:
    """DEL runs every step even when one fails (a link that will not go must not keep the
    address leased), then reports every failure at once."""
    failures = []
    for step in steps:
        try:
            step()
        except PlexusError as exc:
            failures.append(exc)
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise failures[0].with_msg(
            f"DEL of {req.ifname} on network {req.network_name}: "
            + "; ".join(f.msg for f in failures),
        )
