"""One shared object per model, kept in the model's ``__dict__`` while any attachment uses it.

The generate tap and the copy guard are both "install on the model when the first attachment joins,
uninstall when the last one leaves"; this base class is that lifecycle, once.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class PerModel:
    """Subclasses set :attr:`ATTR` and implement :meth:`install` / :meth:`uninstall`."""

    ATTR: str = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.members: list[Any] = []

    def install(self) -> None:
        """Put this object's changes on the model (called once, when the first member joins)."""

    def uninstall(self) -> None:
        """Take them off again (called once, when the last member leaves)."""

    @classmethod
    def join(cls, model: nn.Module, member: Any) -> PerModel:
        shared = model.__dict__.get(cls.ATTR)
        if shared is None:
            shared = cls(model)
            shared.install()
            model.__dict__[cls.ATTR] = shared
        shared.members.append(member)
        return shared

    @classmethod
    def leave(cls, model: nn.Module, member: Any) -> None:
        shared = model.__dict__.get(cls.ATTR)
        if shared is None:
            return
        if member in shared.members:
            shared.members.remove(member)
        if not shared.members:
            shared.uninstall()
            model.__dict__.pop(cls.ATTR, None)
