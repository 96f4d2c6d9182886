"""What the updater remembers across restarts (``update_dir/index-state.json``): a refused
archive is not fetched again by the next Gateway on the same ``update_dir`` (counted on
test_ota.py's real HTTP server on 127.0.0.1), unless it was refused under other trust keys;
a version the app rolled back from stays declined. Plus the state file's bounds, atomic
writes and tolerance of a bad file."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import test_ota
from splitgate.edge import Gateway, publish
from splitgate.edge._update_state import (
    INDEX_STATE_NAME,
    MAX_DECLINED,
    MAX_REASON_CHARS,
    MAX_REFUSED,
    _UpdateState,
)
from test_ota import MODEL, ArchiveServer, _append, _tamper

from splitgate import __version__
from splitgate.security import generate_signing_key, sign_bundle

server = test_ota.server  # test_ota's fixtures: the HTTP server on 127.0.0.1, two signed versions
versions = test_ota.versions


def _key(public: Path) -> Path:
    return public.with_name("signing.key")


def _gateway(v1, stage: Path, server: ArchiveServer, *trust: Path) -> Gateway:
    return Gateway([v1.root], trust=[str(t) for t in trust], update_source=server.url, update_dir=str(stage),
                   update_interval_s=0)  # checks on demand only: the test drives them


def _state(stage: Path) -> dict:
    return json.loads((stage / INDEX_STATE_NAME).read_text())


# -- across a restart, with real Gateways and the real HTTP server ------------------------------


def test_a_refused_archive_is_not_fetched_again_after_a_restart(versions, server: ArchiveServer, tmp_path: Path) -> None:
    public, v1, v2 = versions
    site, stage = server.root, tmp_path / "stage"
    publish([_tamper(v2.root, tmp_path / "tampered")], site, version="v2-tampered", key=_key(public))
    with _gateway(v1, stage, server, public) as gw:
        [out] = gw.check_updates()
        assert out.outcome == "refused" and "signature" in out.detail, out
    fetched = len(server.requests)
    assert fetched == 1
    assert not list((stage / "downloads").glob("*.part")), "a refused download is not kept"
    [sha] = _state(stage)["refused"]
    with _gateway(v1, stage, server, public) as gw:  # the restart: a new Gateway on the same update_dir
        [out] = gw.check_updates()
        assert out.outcome == "skipped" and "signature" in out.detail and "refused at" in out.detail, out
        [out] = gw.check_updates()
        assert out.outcome == "skipped", out
        assert gw.bundle(MODEL).plan_digest == v1.plan_digest
    assert len(server.requests) == fetched, f"the refused archive was fetched again: {server.requests}"
    assert list(_state(stage)["refused"]) == [sha]
    # a fresh update_dir knows nothing: it fetches (and refuses) the archive again
    with _gateway(v1, tmp_path / "fresh", server, public) as gw:
        assert [o.outcome for o in gw.check_updates()] == ["refused"]
    assert len(server.requests) == fetched + 1


def test_an_archive_refused_under_other_trust_keys_is_tried_again(
    versions, server: ArchiveServer, tmp_path: Path,
) -> None:
    """A version signed by a key the device did not trust yet is refused; once the key
    is added to the trust set (a key rotation, a config change and a restart), the
    remembered refusal no longer applies and the version installs."""
    public, v1, v2 = versions
    site, stage = server.root, tmp_path / "stage"
    new_private, new_public = generate_signing_key(tmp_path / "new-keys")
    resigned = shutil.copytree(v2.root, tmp_path / "v2-new-key")
    sign_bundle(resigned, new_private)
    publish([resigned], site, version="v2", key=_key(public))  # (the index stays signed by the old key)
    with _gateway(v1, stage, server, public) as gw:
        [out] = gw.check_updates()
        assert out.outcome == "refused" and "not in the trusted set" in out.detail, out
    with _gateway(v1, stage, server, public) as gw:  # same keys: skipped, not fetched
        assert [o.outcome for o in gw.check_updates()] == ["skipped"]
    assert len(server.requests) == 1
    with _gateway(v1, stage, server, public, new_public) as gw:  # the new key is trusted now
        [out] = gw.check_updates()
        assert out.outcome == "updated", out
        assert gw.bundle(MODEL).plan_digest == v2.plan_digest
    assert len(server.requests) == 2


def test_a_rolled_back_version_stays_declined_after_a_restart(versions, server: ArchiveServer, tmp_path: Path) -> None:
    public, v1, v2 = versions
    site, stage = server.root, tmp_path / "stage"
    publish([v2.root], site, version="v2", key=_key(public))
    with _gateway(v1, stage, server, public) as gw:
        assert [o.outcome for o in gw.check_updates()] == ["updated"]
        gw.rollback_bundle(MODEL)
        [out] = gw.check_updates()
        assert out.outcome == "declined", out
    assert _state(stage)["declined"] == [[MODEL, v2.plan_digest]]
    fetched = len(server.requests)
    with _gateway(v1, stage, server, public) as gw:  # restarted on the app's own v1
        [out] = gw.check_updates()
        assert out.outcome == "declined" and gw.bundle(MODEL).plan_digest == v1.plan_digest, out
        assert gw.infer(MODEL, test_ota._expected(v1)[0]).trace.version == v1.plan_digest[:12]
    assert len(server.requests) == fetched, "a declined version is not fetched"


def test_a_rollback_right_before_closing_is_remembered_too(versions, server: ArchiveServer, tmp_path: Path) -> None:
    """No check runs between the app's rollback and the restart: the rollback itself
    records it (a process killed right after it never closes the Gateway)."""
    public, v1, v2 = versions
    site, stage = server.root, tmp_path / "stage"
    publish([v2.root], site, version="v2", key=_key(public))
    with _gateway(v1, stage, server, public) as gw:
        assert [o.outcome for o in gw.check_updates()] == ["updated"]
        gw.rollback_bundle(MODEL)
        assert _state(stage)["declined"] == [[MODEL, v2.plan_digest]], "written by the rollback, before any close"
    with _gateway(v1, stage, server, public) as gw:
        assert [o.outcome for o in gw.check_updates()] == ["declined"]
        assert gw.bundle(MODEL).plan_digest == v1.plan_digest
    # a plain restart (no rollback) is not a rollback: the update installs again
    other = tmp_path / "other"
    with _gateway(v1, other, server, public) as gw:
        assert [o.outcome for o in gw.check_updates()] == ["updated"]
    with _gateway(v1, other, server, public) as gw:
        assert [o.outcome for o in gw.check_updates()] == ["updated"]
        assert gw.bundle(MODEL).plan_digest == v2.plan_digest


# -- the state file ---------------------------------------------------------------------------


def test_the_state_is_bounded_and_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / INDEX_STATE_NAME
    state = _UpdateState(path)
    state.sequence = 7
    for i in range(MAX_REFUSED + 6):
        state.refuse(f"{i:064x}", "x" * (MAX_REASON_CHARS + 100), ["k1"], at=1_700_000_000.0 + i)
    for i in range(MAX_DECLINED + 6):
        state.decline(f"model{i % 3}", f"{i:064x}")
    i = MAX_DECLINED + 3
    assert not state.decline(f"model{i % 3}", f"{i:064x}"), "already declined"
    state.save()
    assert [p.name for p in tmp_path.iterdir()] == [INDEX_STATE_NAME], "no temporary file left"
    doc = json.loads(path.read_text())
    assert doc["sequence"] == 7
    assert list(doc["refused"]) == [f"{i:064x}" for i in range(6, MAX_REFUSED + 6)], "the oldest went first"
    assert len(doc["declined"]) == MAX_DECLINED and doc["declined"][0] == ["model0", f"{6:064x}"]
    newest = doc["refused"][f"{MAX_REFUSED + 5:064x}"]
    assert len(newest["reason"]) == MAX_REASON_CHARS and newest["trust"] == ["k1"]
    assert newest["splitgate"] == __version__ and newest["at"].endswith("Z")
    assert path.stat().st_size < 64 * 1024
    again = _UpdateState(path)
    assert (again.sequence, again.refused, again.declined) == (7, state.refused, state.declined)
    assert again.refusal(f"{MAX_REFUSED + 5:064x}", ["k1"]) is not None
    assert again.refusal(f"{MAX_REFUSED + 5:064x}", ["k1", "k2"]) is None, "other trust keys: try again"
    assert again.refusal(f"{0:064x}", ["k1"]) is None, "forgotten"
    last = MAX_DECLINED + 5
    assert again.is_declined(f"model{last % 3}", f"{last:064x}") and not again.is_declined("model0", f"{0:064x}")


def test_an_old_bad_or_partly_malformed_state_file_is_read_as_far_as_it_goes(tmp_path: Path, caplog) -> None:
    path = tmp_path / INDEX_STATE_NAME
    path.write_text('{"sequence": 5}')  # what an edge before this change wrote
    old = _UpdateState(path)
    assert (old.sequence, old.refused, old.declined) == (5, {}, [])
    good = {"reason": "smoke run failed", "at": "2026-11-29T18:00:00Z", "trust": [], "splitgate": __version__}
    path.write_text(json.dumps({
        "sequence": 3, "refused": {"a" * 64: good, "not-a-sha": good, "b" * 64: {"reason": 1}},
        "declined": [["m", "c" * 64], ["m"], ["m", "short"], "junk"],
    }))
    with caplog.at_level(logging.WARNING, logger="splitgate.edge.updates"):
        partly = _UpdateState(path)
    assert (partly.sequence, list(partly.refused), partly.declined) == (3, ["a" * 64], [("m", "c" * 64)])
    assert "malformed" in caplog.text
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="splitgate.edge.updates"):
        bad = _UpdateState(path)
    assert (bad.sequence, bad.refused, bad.declined) == (0, {}, [])
    assert "unreadable" in caplog.text


def test_a_state_file_that_cannot_be_written_costs_only_the_memory(
    versions, server: ArchiveServer, tmp_path: Path, caplog,
) -> None:
    """The refusal is still remembered by this process; a WARNING says it is not on disk."""
    _, v1, v2 = versions
    site, stage = server.root, tmp_path / "stage"
    broken = shutil.copytree(v2.root, tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"not a model")  # fails its file digest
    publish([v1.root], site, version="v1")
    _append(site, broken, "v2-broken")
    (stage / INDEX_STATE_NAME).mkdir(parents=True)  # a directory where the file should be: writes fail
    with caplog.at_level(logging.WARNING, logger="splitgate.edge.updates"), _gateway(v1, stage, server) as gw:
        [out] = gw.check_updates()
        assert out.outcome == "refused" and "sha256" in out.detail, out
        assert [o.outcome for o in gw.check_updates()] == ["skipped"]
    assert "remembered by this process only" in caplog.text
    assert len(server.requests) == 1
