"""AdapterSlots without a model: a fake model side records every load, hot swap and delete.

The same policy runs in LocalEngine over peft (tests/test_engine.py checks it end to end on the
tiny model); here each rule is one small test that fails on its own when the policy breaks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.engine.base import BASE_ADAPTER, AdapterError, adapter_name
from bot.engine.slots import AdapterSlots


def vdir(guild: int, version: int) -> Path:
    """A version directory; the slots never open it, only hand it to the model side."""
    return Path(f"/adapters/{guild}/{version}")


@dataclass(frozen=True)
class Prepared:
    """Stands for a version's weights read off the model thread."""

    path: Path


class FakeModel:
    """The model side: which adapter (by directory) each name holds, and a log of calls.

    ``broken`` directories fail to load; a hot swap to one fails half way, leaving the slot
    holding neither version (as peft's hotswap_adapter may). Prepared weights are
    ``Prepared(dir)``: they fit unless their dir is in ``misfit``; a prepared swap of a broken
    dir fails half way too."""

    def __init__(self) -> None:
        self.loaded: dict[str, Path | None] = {}
        self.calls: list[tuple[str, str]] = []
        self.broken: set[Path] = set()
        self.misfit: set[Path] = set()

    def load(self, name: str, path: Path) -> None:
        assert name not in self.loaded, f"{name} loaded twice"
        self.calls.append(("load", f"{name}@{path}"))
        if path in self.broken:
            raise OSError(f"cannot read {path}")
        self.loaded[name] = path

    def hotswap(self, name: str, path: Path) -> None:
        assert name in self.loaded, f"hot swap into {name}, which is not loaded"
        self.calls.append(("hotswap", f"{name}@{path}"))
        if path in self.broken:
            self.loaded[name] = None  # half swapped
            raise RuntimeError("size mismatch in layer 3")
        self.loaded[name] = path

    def swap_prepared(self, name: str, prepared: Prepared) -> bool:
        assert name in self.loaded, f"prepared swap into {name}, which is not loaded"
        self.calls.append(("swap_prepared", f"{name}@{prepared.path}"))
        if prepared.path in self.misfit:
            return False  # nothing changed
        if prepared.path in self.broken:
            self.loaded[name] = None
            raise RuntimeError("copy failed half way")
        self.loaded[name] = prepared.path
        return True

    def delete(self, name: str) -> None:
        self.calls.append(("delete", name))
        del self.loaded[name]

    def serves(self, guild: int) -> Path | None:
        return self.loaded.get(adapter_name(guild))


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


def make(model: FakeModel, capacity: int = 2) -> AdapterSlots:
    return AdapterSlots(model, capacity)


def activate(slots: AdapterSlots, guild: int, version: int, prepared: bool = False) -> None:
    path = vdir(guild, version)
    slots.activate(guild, version, path, Prepared(path) if prepared else None)


def assert_consistent(slots: AdapterSlots, model: FakeModel) -> None:
    """What the slots think is resident is exactly what the model holds."""
    assert sorted(model.loaded) == sorted(adapter_name(g) for g in slots.resident())


# -- LRU ----------------------------------------------------------------------------------------

def test_least_recently_used_adapter_is_evicted_first(model: FakeModel) -> None:
    slots = make(model, capacity=2)
    for g in (1, 2):
        activate(slots, g, 1)
    assert slots.serving(1) == ("g1", 1)  # 1 is now more recent than 2
    activate(slots, 3, 1)
    assert slots.resident() == [1, 3]
    assert ("delete", "g2") in model.calls and "g2" not in model.loaded
    assert slots.versions() == {1: 1, 2: 1, 3: 1}  # evicted is not deactivated
    assert_consistent(slots, model)


def test_a_load_never_evicts_a_pinned_guild(model: FakeModel) -> None:
    # The step loop pins the guilds with running rows around a control: a load into full
    # slots evicts the least recently used adapter that no running row uses.
    slots = make(model, capacity=2)
    for g in (1, 2):
        activate(slots, g, 1)  # 1 is the least recently used now
    slots.pinned = frozenset({1})
    activate(slots, 3, 1)
    assert slots.resident() == [1, 3] and "g2" not in model.loaded
    slots.pinned = frozenset()
    activate(slots, 4, 1)  # unpinned: plain LRU again
    assert slots.resident() == [3, 4]
    assert_consistent(slots, model)


def test_an_evicted_guild_reloads_its_version_on_demand(model: FakeModel) -> None:
    slots = make(model, capacity=1)
    activate(slots, 1, 4)
    activate(slots, 2, 1)
    assert slots.resident() == [2]
    assert slots.serving(1) == ("g1", 4)
    assert model.serves(1) == vdir(1, 4) and slots.resident() == [1]
    assert_consistent(slots, model)


def test_guilds_of_the_current_batch_are_not_evicted_until_it_ends(model: FakeModel) -> None:
    slots = make(model, capacity=1)
    activate(slots, 1, 1)
    activate(slots, 2, 1)  # evicts 1
    batch = {1, 2}
    assert slots.serving(1, batch) == ("g1", 1)
    assert slots.resident() == [2, 1]  # over the cap while the batch needs both
    slots.trim()  # after the batch
    assert slots.resident() == [1]
    assert_consistent(slots, model)


def test_serving_the_base_model_for_a_guild_without_adapter(model: FakeModel) -> None:
    slots = make(model)
    assert slots.serving(None) == (BASE_ADAPTER, None)
    assert slots.serving(5) == (BASE_ADAPTER, None)
    assert not slots.wants(5) and model.calls == []


# -- hot swap -----------------------------------------------------------------------------------

def test_new_version_of_a_resident_guild_is_hot_swapped_in_place(model: FakeModel) -> None:
    slots = make(model)
    activate(slots, 7, 1)
    activate(slots, 7, 2)
    assert model.calls == [("load", f"g7@{vdir(7, 1)}"), ("hotswap", f"g7@{vdir(7, 2)}")]
    assert model.serves(7) == vdir(7, 2)
    assert slots.serving(7) == ("g7", 2) and slots.versions() == {7: 2}


def test_activating_the_serving_version_again_does_nothing(model: FakeModel) -> None:
    slots = make(model)
    activate(slots, 7, 1)
    calls = list(model.calls)
    activate(slots, 7, 1)
    assert model.calls == calls


def test_new_version_of_an_evicted_guild_is_loaded_fresh(model: FakeModel) -> None:
    slots = make(model, capacity=1)
    activate(slots, 7, 1)
    activate(slots, 8, 1)  # evicts 7
    activate(slots, 7, 2)
    assert model.calls[-1] == ("load", f"g7@{vdir(7, 2)}")
    assert slots.serving(7) == ("g7", 2) and slots.resident() == [7]
    assert_consistent(slots, model)


# -- failures -----------------------------------------------------------------------------------

def test_a_failed_load_leaves_the_previous_version_serving(model: FakeModel) -> None:
    slots = make(model, capacity=1)
    activate(slots, 7, 1)
    activate(slots, 8, 1)  # evicts 7: its next version is a load, not a swap
    model.broken.add(vdir(7, 2))
    with pytest.raises(AdapterError, match=r"guild 7 v2 .*load failed \(OSError"):
        activate(slots, 7, 2)
    assert slots.versions() == {7: 1, 8: 1}
    assert slots.serving(7) == ("g7", 1) and model.serves(7) == vdir(7, 1)
    assert_consistent(slots, model)


def test_a_failed_first_load_leaves_the_guild_on_the_base_model(model: FakeModel) -> None:
    slots = make(model)
    model.broken.add(vdir(9, 1))
    with pytest.raises(AdapterError, match="load failed"):
        activate(slots, 9, 1)
    assert slots.versions() == {} and slots.serving(9) == (BASE_ADAPTER, None)
    assert_consistent(slots, model)


def test_a_failed_hot_swap_rebuilds_the_slot_from_the_previous_version(model: FakeModel) -> None:
    slots = make(model)
    activate(slots, 7, 1)
    model.broken.add(vdir(7, 2))
    with pytest.raises(AdapterError, match=r"guild 7 v2 .*hot swap failed \(RuntimeError"):
        activate(slots, 7, 2)
    # The half-swapped slot was deleted and v1 loaded again from its directory.
    assert model.calls[-2:] == [("delete", "g7"), ("load", f"g7@{vdir(7, 1)}")]
    assert model.serves(7) == vdir(7, 1)
    assert slots.serving(7) == ("g7", 1) and slots.versions() == {7: 1}
    assert_consistent(slots, model)


def test_when_the_rebuild_fails_too_the_base_model_serves_and_a_later_version_loads(
        model: FakeModel, caplog: pytest.LogCaptureFixture) -> None:
    slots = make(model)
    activate(slots, 7, 1)
    model.broken |= {vdir(7, 1), vdir(7, 2)}  # v1's files went bad meanwhile
    with caplog.at_level(logging.ERROR), pytest.raises(AdapterError, match="hot swap failed"):
        activate(slots, 7, 2)
    assert "g7" not in model.loaded  # never left half swapped
    assert slots.serving(7) == (BASE_ADAPTER, None)
    assert slots.versions() == {} and not slots.wants(7)
    assert any("failed to reload too" in r.getMessage() for r in caplog.records)
    activate(slots, 7, 3)
    assert slots.serving(7) == ("g7", 3) and slots.versions() == {7: 3}
    assert_consistent(slots, model)


def test_an_evicted_guild_whose_files_vanished_is_tried_once(model: FakeModel) -> None:
    slots = make(model, capacity=1)
    activate(slots, 1, 1)
    activate(slots, 2, 1)  # evicts 1
    model.broken.add(vdir(1, 1))
    assert slots.serving(1) == (BASE_ADAPTER, None)
    loads = [c for c in model.calls if c[0] == "load"]
    assert slots.serving(1) == (BASE_ADAPTER, None)
    assert [c for c in model.calls if c[0] == "load"] == loads  # not retried per request
    assert slots.versions() == {2: 1}
    assert_consistent(slots, model)


def test_deactivate_unloads_and_forgets_the_guild(model: FakeModel) -> None:
    slots = make(model)
    activate(slots, 1, 1)
    activate(slots, 2, 1)
    slots.deactivate(1)
    assert slots.versions() == {2: 1} and slots.resident() == [2]
    assert slots.serving(1) == (BASE_ADAPTER, None)
    assert_consistent(slots, model)


# -- hot swap from weights prepared off the model thread ----------------------------------------

def test_prepared_weights_swap_a_resident_slot_without_reading_files(model: FakeModel) -> None:
    slots = make(model)
    activate(slots, 7, 1, prepared=True)  # not resident: a load (the prepared weights unused)
    activate(slots, 7, 2, prepared=True)
    assert model.calls == [("load", f"g7@{vdir(7, 1)}"), ("swap_prepared", f"g7@{vdir(7, 2)}")]
    assert model.serves(7) == vdir(7, 2)
    assert slots.serving(7) == ("g7", 2) and slots.versions() == {7: 2}
    assert_consistent(slots, model)


def test_prepared_weights_that_do_not_fit_fall_back_to_the_files(model: FakeModel) -> None:
    slots = make(model)
    activate(slots, 7, 1)
    model.misfit.add(vdir(7, 2))
    activate(slots, 7, 2, prepared=True)
    assert model.calls[-2:] == [("swap_prepared", f"g7@{vdir(7, 2)}"),
                                ("hotswap", f"g7@{vdir(7, 2)}")]
    assert slots.serving(7) == ("g7", 2) and model.serves(7) == vdir(7, 2)
    assert_consistent(slots, model)


def test_misfit_prepared_weights_of_a_broken_version_keep_the_old_one(model: FakeModel) -> None:
    slots = make(model)
    activate(slots, 7, 1)
    model.misfit.add(vdir(7, 2))
    model.broken.add(vdir(7, 2))
    with pytest.raises(AdapterError, match="hot swap failed"):
        activate(slots, 7, 2, prepared=True)
    assert model.calls[-2:] == [("delete", "g7"), ("load", f"g7@{vdir(7, 1)}")]
    assert slots.serving(7) == ("g7", 1) and slots.versions() == {7: 1}
    assert_consistent(slots, model)


def test_a_prepared_swap_failing_half_way_rebuilds_the_slot(model: FakeModel) -> None:
    slots = make(model)
    activate(slots, 7, 1)
    model.broken.add(vdir(7, 2))
    with pytest.raises(AdapterError, match=r"guild 7 v2 .*hot swap failed \(RuntimeError"):
        activate(slots, 7, 2, prepared=True)
    assert ("hotswap", f"g7@{vdir(7, 2)}") not in model.calls  # no second try from the files
    assert model.calls[-2:] == [("delete", "g7"), ("load", f"g7@{vdir(7, 1)}")]
    assert slots.serving(7) == ("g7", 1) and slots.versions() == {7: 1}
    assert_consistent(slots, model)
