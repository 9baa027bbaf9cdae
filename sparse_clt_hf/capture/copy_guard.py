"""Deep copies and pickles of an attached model are plain models (no hook, no generate wrapper)."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .per_model import PerModel
from .tap import GenerateTap


class CopyGuard(PerModel):
    """Makes ``copy.deepcopy(model)`` and ``pickle.dumps(model)`` of an attached model a plain model.

    Installed as the instance's ``__deepcopy__`` and ``__reduce_ex__`` (which ``copy`` and ``pickle``
    look up on the instance): for the time of the copy it takes our hooks, the generate wrapper and
    itself off the model (restoring every hook table in its order afterwards), so the copy is what
    the model would be without any attachment. Pickling goes through such a copy (memory: one model).
    """

    ATTR = "_sparse_clt_copy_guard"
    SLOTS = ("__deepcopy__", "__reduce_ex__")

    def deepcopy(self, memo: dict) -> nn.Module:
        model = self.model
        tap = model.__dict__.get(GenerateTap.ATTR)
        keys = (*self.SLOTS, self.ATTR, GenerateTap.ATTR, *(tap.names if tap is not None else ()))
        saved_attrs = {k: model.__dict__.pop(k) for k in keys if k in model.__dict__}
        if tap is not None:
            model.__dict__.update(tap.saved)  # the model's own instance attributes, as before attaching
        tables = self._hook_tables()
        saved_tables = [(t, list(t.items())) for t in tables]
        ours = {h.id for att in self.members for h in att._all_handles()}
        for t in tables:
            for hid in ours & set(t):
                del t[hid]
        try:
            return copy.deepcopy(model, memo)
        finally:
            for t, items in saved_tables:
                t.clear()
                t.update(items)
            for name in tap.names if tap is not None else ():
                model.__dict__.pop(name, None)
            model.__dict__.update(saved_attrs)

    def reduce_ex(self, protocol: int) -> Any:
        return copy.deepcopy(self.model).__reduce_ex__(protocol)

    def _hook_tables(self) -> list[dict]:
        """Every hook table (forward hooks, pre-hooks, their kwargs flags) that holds one of our hooks."""
        tables: dict[int, dict] = {}
        for att in self.members:
            for handle in att._all_handles():
                refs = [handle.hooks_dict_ref, *getattr(handle, "extra_dict_ref", ())]
                for ref in refs:
                    table = ref()
                    if table is not None:
                        tables[id(table)] = table
        return list(tables.values())

    def install(self) -> None:
        self.model.__dict__["__deepcopy__"] = self.deepcopy
        self.model.__dict__["__reduce_ex__"] = self.reduce_ex

    def uninstall(self) -> None:
        for key in self.SLOTS:
            self.model.__dict__.pop(key, None)
