"""The versioned registry: atomic folders, one live version, rejected never live, retention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evertune.adapters import registry
from evertune.store import versions
from evertune.store.errors import RegistryError


def fake_adapter(folder: Path) -> Path:
    """Files shaped like peft's output (a real safetensors header), for registry mechanics."""
    folder.mkdir(parents=True)
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    (folder / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "bias": "none"}))
    return folder


def new_version(db, layout, domain="legal", parent=None):
    v = registry.begin(db, layout.adapters, domain, None, parent.id if parent else None)
    staging = fake_adapter(registry.staging_dir(layout.adapters, domain, v.number))
    registry.publish(v, staging, {"version": v.name})
    return versions.set_state(db, v, "candidate")


def test_versions_are_numbered_per_domain_and_published_by_rename(db, layout):
    v1 = new_version(db, layout)
    v2 = new_version(db, layout, parent=v1)
    other = new_version(db, layout, domain="medical")
    assert (v1.name, v2.name, other.name) == ("v0001", "v0002", "v0001")
    assert Path(v2.path) == layout.adapters / "legal" / "v0002"
    assert json.loads((Path(v2.path) / "meta.json").read_text()) == {"version": "v0002"}
    assert not list((layout.adapters / "legal").glob(".*"))  # no staging left behind
    assert versions.get(db, v2.id).parent == "v0001"


def test_exactly_one_live_version_and_promotion_retires_the_previous(db, layout):
    v1 = registry.promote(db, new_version(db, layout))
    registry.promote(db, new_version(db, layout, parent=v1))
    states = {v.name: v.state for v in versions.list_versions(db, "legal")}
    assert states == {"v0001": "retired", "v0002": "live"}
    assert versions.live(db, "legal").name == "v0002"
    with pytest.raises(Exception, match="UNIQUE"):  # the database itself refuses two
        db.execute("UPDATE versions SET state = 'live' WHERE id = ?", [v1.id])


def test_a_rejected_candidate_can_never_become_live(db, layout):
    v = versions.reject(db, new_version(db, layout), "refused", "drift +300%")
    with pytest.raises(RegistryError, match="rejected: only a candidate or a retired"):
        registry.promote(db, v)
    assert versions.live(db, "legal") is None
    assert Path(v.path).exists()  # rejected versions keep their folder and number


def test_rollback_promotes_a_retired_version(db, layout):
    v1 = registry.promote(db, new_version(db, layout))
    registry.promote(db, new_version(db, layout, parent=v1))
    back = registry.promote(db, versions.find(db, "legal", "v0001"), "rollback")
    assert back.state == "live" and versions.find(db, "legal", "v0002").state == "retired"


def test_interrupted_training_leaves_no_visible_version(db, layout):
    v = registry.begin(db, layout.adapters, "legal", None, None)
    staging = registry.staging_dir(layout.adapters, "legal", v.number)
    staging.mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_bytes(b"half")  # killed mid-save
    assert not Path(v.path).exists()
    [abandoned] = registry.abandon_unfinished(db, layout.adapters)
    assert abandoned.state == "rejected" and "interrupted" in abandoned.reason
    assert not staging.exists() and not Path(v.path).exists()
    assert new_version(db, layout).name == "v0002"  # the number is not reused


def test_a_candidate_left_by_an_interrupted_publish_is_rejected_and_the_live_one_kept(db, layout):
    """Before: a kill between the gate's verdict and the version recorded live left it a
    'candidate' for ever."""
    live = registry.promote(db, new_version(db, layout))
    cut_short = new_version(db, layout, parent=live)
    [abandoned] = registry.abandon_unfinished(db, layout.adapters)
    assert abandoned.id == cut_short.id
    assert abandoned.state == "rejected" and abandoned.reason == "publishing was interrupted"
    assert versions.live(db, "legal").id == live.id


@pytest.mark.parametrize("damage", ["missing", "corrupt", "dora"])
def test_incomplete_or_unservable_folders_are_refused(db, layout, tmp_path, damage):
    folder = fake_adapter(tmp_path / "a")
    if damage == "missing":
        (folder / "adapter_config.json").unlink()
    elif damage == "corrupt":
        (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 16)
    else:
        (folder / "adapter_config.json").write_text(json.dumps({"use_dora": True}))
    with pytest.raises(RegistryError):
        registry.check_files(folder)


def test_promote_refuses_a_version_whose_folder_was_damaged(db, layout):
    v = new_version(db, layout)
    (Path(v.path) / "adapter_model.safetensors").unlink()
    with pytest.raises(RegistryError, match=r"adapter_model\.safetensors is missing"):
        registry.promote(db, v)
    assert versions.live(db, "legal") is None


def test_retention_keeps_live_pinned_and_the_last_n(db, layout):
    vs = [new_version(db, layout) for _ in range(6)]
    registry.promote(db, vs[1])
    db.execute("UPDATE versions SET pinned = 1 WHERE id = ?", [vs[0].id])
    removed = registry.prune(db, "legal", keep_last=2)
    assert sorted(p.name for p in removed) == ["v0003", "v0004"]
    kept = sorted(p.name for p in (layout.adapters / "legal").iterdir())
    assert kept == ["v0001", "v0002", "v0005", "v0006"]
    assert "folder removed" in versions.find(db, "legal", "v0003").reason


def test_version_names_are_checked(db, layout):
    with pytest.raises(RegistryError, match="not a version name"):
        versions.find(db, "legal", "7")
    with pytest.raises(RegistryError, match="legal has no version v0009"):
        versions.find(db, "legal", "v0009")
