"""Signed update index with rollback protection (issue 17 follow-up, TUF-lite).

A real Gateway (real onnxruntime) polls a real ThreadingHTTPServer on 127.0.0.1
(test_ota.py's server) while a thread sends requests the whole time. The index
is signed by ``splitgate publish --key``; every forged index (unsigned, foreign
key, changed after signing, expired, replayed with a lower sequence -- also
after a restart with the same update_dir, or promoting an older version) is
refused and the running version keeps serving."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import test_ota
from splitgate.edge import Gateway, UpdateOutcome, publish
from splitgate.edge._update_index import INDEX_NAME, _parse_index, _signed_doc, read_index, sign_index
from splitgate.edge._update_state import INDEX_STATE_NAME
from splitgate.edge._updates import OUTCOMES, Updater
from test_ota import MODEL, ArchiveServer, Load, _counts

from splitgate.cli import main as cli_main
from splitgate.errors import ConfigError, UpdateIndexError
from splitgate.security import generate_signing_key
from splitgate.security._signing import TrustedKeys, load_signing_key

server = test_ota.server  # test_ota's fixtures: the HTTP server on 127.0.0.1, two signed versions
versions = test_ota.versions


@pytest.fixture(scope="module")
def foreign_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key pair nobody trusts (someone controlling the mirror)."""
    private, _ = generate_signing_key(tmp_path_factory.mktemp("foreign"))
    return private


def _key(public: Path) -> Path:
    return public.with_name("signing.key")


def _doc(site: Path) -> dict:
    return json.loads((site / INDEX_NAME).read_text())


def _write(site: Path, doc_or_bytes: dict | bytes) -> None:
    data = doc_or_bytes if isinstance(doc_or_bytes, bytes) else json.dumps(doc_or_bytes).encode()
    (site / INDEX_NAME).write_bytes(data)


def _unsigned(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "signatures"}


def _one(gw: Gateway) -> UpdateOutcome:
    [out] = gw.check_updates()
    return out


# -- the sequence under load ---------------------------------------------------------------------


def test_signed_index_installs_and_forged_indexes_are_refused_with_no_failed_request(
    versions, server: ArchiveServer, foreign_key: Path, tmp_path: Path,
) -> None:
    public, v1, v2 = versions
    site, stage, key = server.root, tmp_path / "stage", _key(public)
    [e1] = publish([v1.root], site, version="v1", key=key)
    replay = (site / INDEX_NAME).read_bytes()  # sequence 1, newest v1: validly signed, kept by an attacker
    seen: list[UpdateOutcome] = []
    gw = Gateway([v1.root], trust=[str(public)], update_source=server.url, update_dir=str(stage),
                 update_interval_s=0)
    gw.on_update(seen.append)
    load = Load(gw, v1, v2).start()
    try:
        load.wait_answers(3)
        assert _one(gw).outcome == "current"
        [e2] = publish([v2.root], site, version="v2", key=key)
        assert (e1.sequence, e2.sequence) == (1, 2)
        good = _doc(site)
        out = _one(gw)
        assert out.outcome == "updated" and gw.bundle(MODEL).plan_digest == v2.plan_digest, out
        assert json.loads((stage / INDEX_STATE_NAME).read_text())["sequence"] == 2
        load.wait_answers(3)

        # a replayed older index (sequence 1, valid signature, newest entry v1): a rollback attack
        _write(site, replay)
        out = _one(gw)
        assert out.outcome == "untrusted-index" and "sequence 1 is lower than 2" in out.detail, out
        # the index without its signature
        _write(site, _unsigned(good))
        out = _one(gw)
        assert out.outcome == "untrusted-index" and "unsigned" in out.detail and "--key" in out.detail, out
        # signed by a key the edge does not trust
        _write(site, _signed_doc(_unsigned(good), load_signing_key(foreign_key)))
        out = _one(gw)
        assert out.outcome == "untrusted-index" and "none of them in the trusted set" in out.detail, out
        # changed after signing: the newest entry now points at v1's archive and plan
        tampered = json.loads(json.dumps(good))
        tampered["models"][MODEL][-1] = {**json.loads(replay)["models"][MODEL][-1], "sequence": 2}
        _write(site, tampered)
        out = _one(gw)
        assert out.outcome == "untrusted-index" and "does not verify" in out.detail, out
        # expired (a frozen source): re-signed with a one-second lifetime, then too late
        _write(site, good)
        sign_index(site, key, expires_days=1 / 86400)
        time.sleep(1.1)
        out = _one(gw)
        assert out.outcome == "untrusted-index" and "expired" in out.detail, out
        assert json.loads((stage / INDEX_STATE_NAME).read_text())["sequence"] == 2  # refused: no state change
        load.wait_answers(3)
        assert gw.bundle(MODEL).plan_digest == v2.plan_digest

        # a validly signed, newer index whose newest entry was published before the running version
        promote_old = _unsigned(json.loads(replay))
        promote_old.update(sequence=10, expires=good["expires"])
        _write(site, _signed_doc(promote_old, load_signing_key(key)))
        out = _one(gw)
        assert out.outcome == "downgrade" and "sequence 1" in out.detail and "sequence 2" in out.detail, out
        assert gw.bundle(MODEL).plan_digest == v2.plan_digest
        # the publisher's own way back: re-publishing v1 gives it a new sequence; installed
        [back] = publish([v1.root], site, version="v1", key=key)
        assert back.sequence == 11
        out = _one(gw)
        assert out.outcome == "updated" and gw.bundle(MODEL).plan_digest == v1.plan_digest, out
        load.wait_answers(3)
    finally:
        load.stop()
        gw.close()

    assert not load.failures, load.failures[:3]
    assert "wrong" not in load.answers
    first_v2, last_v2 = load.answers.index("v2"), len(load.answers) - 1 - load.answers[::-1].index("v2")
    assert set(load.answers[:first_v2]) == {"v1"} and set(load.answers[first_v2:last_v2 + 1]) == {"v2"}
    assert load.answers[-1] == "v1"
    assert [o.outcome for o in seen] == ["current", "updated"] + ["untrusted-index"] * 5 + ["downgrade", "updated"]
    assert _counts(gw) == {"current": 1, "updated": 2, "downgrade": 1}
    index_counts = {k: v for k, v in gw.metrics.snapshot().items()
                    if k.startswith("splitgate_updates_total{") and "model=," in k.replace('"', "")}
    assert sum(index_counts.values()) == 5 and all("untrusted-index" in k for k in index_counts), index_counts


def test_replayed_index_is_refused_after_a_restart_with_the_same_update_dir(
    versions, server: ArchiveServer, tmp_path: Path,
) -> None:
    public, v1, v2 = versions
    site, stage, key = server.root, tmp_path / "stage", _key(public)
    publish([v1.root], site, version="v1", key=key)
    replay = (site / INDEX_NAME).read_bytes()
    publish([v2.root], site, version="v2", key=key)
    config = {"trust": [str(public)], "update_source": server.url, "update_dir": str(stage),
              "update_interval_s": 0}
    with Gateway([v2.root], **config) as gw:
        assert _one(gw).outcome == "current"  # sequence 2 accepted and persisted
    _write(site, replay)
    with Gateway([v2.root], **config) as gw:  # the restarted device: a new process state, the same update_dir
        load = Load(gw, v1, v2).start()
        try:
            load.wait_answers(3)
            out = _one(gw)
            assert out.outcome == "untrusted-index" and "lower than 2" in out.detail, out
            load.wait_answers(3)
        finally:
            load.stop()
        assert gw.bundle(MODEL).plan_digest == v2.plan_digest
        assert not load.failures and set(load.answers) == {"v2"}
    # with the state gone (a fresh update_dir) the same replay is accepted: what the state is for
    _write(site, replay)
    with Gateway([v2.root], **{**config, "update_dir": str(tmp_path / "fresh")}) as gw:
        out = _one(gw)
        assert out.outcome == "updated" and gw.bundle(MODEL).plan_digest == v1.plan_digest, out


# -- without trust keys, and allow_unsigned ----------------------------------------------------------


def test_without_trust_keys_the_index_is_not_verified_and_one_warning_says_so(
    versions, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import splitgate.edge._updates as updates

    monkeypatch.setattr(updates, "_warned_unverified", type(updates._warned_unverified)())
    _, v1, v2 = versions
    site = tmp_path / "site"
    publish([v2.root], site, version="v2")
    assert "signatures" not in _doc(site) and _doc(site)["sequence"] == 1
    with caplog.at_level(logging.WARNING, "splitgate.edge.updates"), \
            Gateway([v1.root], update_source=str(site), update_dir=str(tmp_path / "s"), update_interval_s=0) as gw:
        assert _one(gw).outcome == "updated"
        assert _one(gw).outcome == "current"
    warnings = [r for r in caplog.records if "not verified" in r.getMessage()]
    assert len(warnings) == 1


def test_allow_unsigned_accepts_an_unsigned_index_but_still_checks_a_signed_one(
    versions, foreign_key: Path, tmp_path: Path,
) -> None:
    public, v1, v2 = versions
    site = tmp_path / "site"
    publish([v2.root], site, version="v2")
    unsigned = _doc(site)
    with Gateway([v1.root], trust=[str(public)], allow_unsigned=True, update_source=str(site),
                 update_dir=str(tmp_path / "s"), update_interval_s=0) as gw:
        _write(site, _signed_doc(unsigned, load_signing_key(foreign_key)))
        out = _one(gw)
        assert out.outcome == "untrusted-index" and "trusted set" in out.detail, out
        _write(site, unsigned)
        assert _one(gw).outcome == "updated"


# -- the parts on their own ------------------------------------------------------------------------


class _FakeGateway:
    """Unit test stand-in: one model at one plan (no installs reach it)."""

    def __init__(self, bundle) -> None:
        self._bundle = bundle

    @property
    def models(self) -> list[str]:
        return [MODEL]

    def bundle(self, model: str):
        return self._bundle

    def update_bundle(self, source, *, smoke: bool = True):
        raise AssertionError("not reached")


def test_expiry_uses_the_updaters_clock_and_the_state_file_survives(versions, tmp_path: Path) -> None:
    public, v1, _ = versions
    site, stage = tmp_path / "site", tmp_path / "stage"
    publish([v1.root], site, version="v1", key=_key(public), expires_days=2)
    trusted = TrustedKeys.from_paths([public])
    now = time.time()
    fresh = Updater(_FakeGateway(v1), str(site), update_dir=stage, interval_s=0, trusted=trusted, clock=lambda: now)
    assert [o.outcome for o in fresh.check()] == ["current"]
    late = Updater(_FakeGateway(v1), str(site), update_dir=stage, interval_s=0, trusted=trusted,
                   clock=lambda: now + 3 * 86400)
    [out] = late.check()
    assert out.outcome == "untrusted-index" and "expired" in out.detail and "freeze" in out.detail, out
    with pytest.raises(UpdateIndexError, match="expired at"):  # the typed error behind the outcome
        late._trust_index(_parse_index((site / INDEX_NAME).read_bytes(), "index"))
    (stage / INDEX_STATE_NAME).write_text('{"sequence": 5}')
    [out] = Updater(_FakeGateway(v1), str(site), update_dir=stage, interval_s=0, trusted=trusted).check()
    assert out.outcome == "untrusted-index" and "sequence 1 is lower than 5" in out.detail, out
    assert "untrusted-index" in OUTCOMES and "downgrade" in OUTCOMES


def test_publish_signs_bumps_the_sequence_and_keeps_old_readers_working(versions, tmp_path: Path) -> None:
    public, v1, v2 = versions
    site, key = tmp_path / "site", _key(public)
    [a] = publish([v1.root], site, key=key)
    [b] = publish([v2.root], site, key=key, expires_days=7)
    doc = _doc(site)
    assert (a.sequence, b.sequence, doc["sequence"]) == (1, 2, 2)
    assert [e["sequence"] for e in doc["models"][MODEL]] == [1, 2]
    assert doc["signatures"][0]["key_id"] == TrustedKeys.from_paths([public]).ids[0]
    assert doc["expires"].endswith("Z")
    assert [e.plan_digest for e in read_index((site / INDEX_NAME).read_bytes())[MODEL]] == [
        v1.plan_digest, v2.plan_digest]
    with pytest.raises(ConfigError, match="is signed: publish with --key"):
        publish([v1.root], site)  # would drop the signature every trusting edge needs
    with pytest.raises(ConfigError, match="expires-days"):
        publish([v1.root], site, key=key, expires_days=0)
    assert _doc(site)["sequence"] == 2  # nothing written by the refused calls


def test_cli_publish_key_twice_bumps_the_sequence_and_a_missing_key_is_one_line(
    versions, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    public, v1, v2 = versions
    site = tmp_path / "site"
    assert cli_main(["publish", str(v1.root), "--to", str(site), "--key", str(_key(public))]) == 0
    assert "index sequence 1, signed, expires in 30 days" in capsys.readouterr().out
    assert cli_main(["publish", str(v2.root), "--to", str(site), "--key", str(_key(public)),
                     "--expires-days", "3"]) == 0
    assert "index sequence 2, signed, expires in 3 days" in capsys.readouterr().out
    assert _doc(site)["sequence"] == 2 and len(_doc(site)["signatures"]) == 1
    assert cli_main(["publish", str(v2.root), "--to", str(site), "--key", str(tmp_path / "missing.key")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.key" in err and "splitgate keys" in err, err
    assert cli_main(["publish", str(v2.root), "--to", str(site)]) == 2  # unsigned over a signed index
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--key" in err, err
    assert _doc(site)["sequence"] == 2
