"""The server's sqlite store (keys hashed, org scoping, stable pages) and create-body mapping."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import msgspec
import pytest

from corral.server.http import ApiError
from corral.server.models import CreateSandboxRequest
from corral.server.spec import plan_create
from corral.server.store import Store

SDK_DEFAULT_BODY = (
    b'{"source":"oci","name":"demo2","runtime":{"workdir":"/w","shell":null,"scripts":{},'
    b'"entrypoint":null,"cmd":null,"user":null,"log_level":null},"env":[{"key":"A","value":"1"}],'
    b'"labels":{},"rlimits":[],"mounts":[],"network":{"enabled":true,"strict":true},"init":null,'
    b'"security_profile":"default","lifecycle":{"ephemeral":true,"max_duration_secs":60,'
    b'"idle_timeout_secs":30},"reference":"alpine","resources":{"vcpus":2,"memory_mib":1024},'
    b'"patches":[],"pull_policy":"if_missing"}'
)


def body(**changes: object) -> CreateSandboxRequest:
    req = msgspec.json.decode(SDK_DEFAULT_BODY, type=CreateSandboxRequest)
    return msgspec.structs.replace(req, **changes)


def test_keys_are_stored_hashed_and_revocable(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    info, key = store.create_key("acme", "ci")
    assert key.startswith(f"crl_{info.id}_") and len(key) > 40
    assert store.authenticate(key) == info.org_id
    assert store.authenticate(key + "x") is None
    assert store.authenticate("Bearer " + key) is None
    store.close()
    raw = (tmp_path / "server.db").read_bytes()
    wal = tmp_path / "server.db-wal"
    if wal.exists():
        raw += wal.read_bytes()
    assert key.encode() not in raw
    db = sqlite3.connect(tmp_path / "server.db")
    (stored,) = db.execute("SELECT hash FROM api_keys").fetchone()
    db.close()
    assert stored == hashlib.sha256(key.encode()).hexdigest()
    assert (tmp_path / "server.db").stat().st_mode & 0o777 == 0o600

    # another process (the CLI) revokes; the server's store sees it on the next request
    server = Store.open(tmp_path)
    cli = Store.open(tmp_path)
    assert server.authenticate(key) == info.org_id
    assert cli.revoke_key(info.id) is True
    assert cli.revoke_key(info.id) is False
    assert server.authenticate(key) is None
    assert [k.revoked_at is not None for k in server.list_keys("acme")] == [True]
    server.close()
    cli.close()


def test_orgs_are_separate(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    a, _ = store.create_key("a")
    b, _ = store.create_key("b")
    a2, _ = store.create_key("a")
    assert a.org_id == a2.org_id != b.org_id
    spec = plan_create(body(name="same"), allow_network=False).spec_out()
    ra = store.new_sandbox(a.org_id, "same", spec, ephemeral=False, shell=None)
    rb = store.new_sandbox(b.org_id, "same", spec, ephemeral=False, shell=None)
    assert ra.id != rb.id
    assert store.get(a.org_id, rb.id) is None
    assert store.get_by_name(b.org_id, "same") is rb
    assert [r.id for r in store.page(a.org_id)[0]] == [ra.id]
    assert store.list_keys("a") == [k for k in store.list_keys() if k.org_name == "a"]
    store.close()


def test_pages_are_stable_while_records_come_and_go(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    spec = plan_create(body(), allow_network=False).spec_out()
    recs = [store.new_sandbox("o", f"s{i}", spec, ephemeral=False, shell=None) for i in range(7)]
    page, after = store.page("o", limit=3)
    assert [r.name for r in page] == ["s0", "s1", "s2"] and after == recs[2].seq
    store.delete(recs[1])  # behind the cursor
    store.delete(recs[3])  # just ahead of it
    store.new_sandbox("o", "late", spec, ephemeral=False, shell=None)
    assert after is not None
    page, after = store.page("o", after_seq=after, limit=3)
    assert [r.name for r in page] == ["s4", "s5", "s6"] and after is not None
    page, after = store.page("o", after_seq=after, limit=3)
    assert [r.name for r in page] == ["late"] and after is None
    labelled = store.new_sandbox(
        "o", "lab", msgspec.structs.replace(spec, labels={"team": "x"}), ephemeral=False, shell=None
    )
    assert store.page("o", labels={"team": "x"}) == ([labelled], None)
    store.close()

    reopened = Store.open(tmp_path)
    loaded = reopened.load_sandboxes()
    assert [r.name for r in loaded] == ["s0", "s2", "s4", "s5", "s6", "late", "lab"]
    assert reopened.get("o", labelled.id) is not None
    new = reopened.new_sandbox("o", "after-restart", spec, ephemeral=False, shell=None)
    assert new.seq > labelled.seq
    reopened.close()


def test_plan_maps_the_sdk_body() -> None:
    plan = plan_create(body(), allow_network=False)
    assert (plan.name, plan.image, plan.cpus, plan.memory_mib) == ("demo2", "alpine", 2, 1024)
    assert (plan.env, plan.workdir, plan.ephemeral) == ({"A": "1"}, "/w", True)
    assert (plan.max_duration_secs, plan.idle_timeout_secs) == (60, 30)
    assert plan.network is False  # SDK default network, server without --sandbox-network host
    assert plan_create(body(), allow_network=True).network is True


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("name", "-bad", "invalid_name"),
        ("name", "x" * 129, "invalid_name"),
        ("source", "bind", "unsupported_field"),
        ("reference", "", "invalid_request"),
        ("rlimits", [{"resource": "nofile", "soft": 1, "hard": 1}], "unsupported_field"),
        ("mounts", [{"x": 1}], "unsupported_field"),
        ("patches", [{"x": 1}], "unsupported_field"),
        ("init", {"cmd": "/sbin/init"}, "unsupported_field"),
        ("pull_policy", "always", "unsupported_field"),
        ("security_profile", "restricted", "unsupported_field"),
    ],
)
def test_plan_rejects_what_corral_cannot_honour(field: str, value: object, code: str) -> None:
    with pytest.raises(ApiError) as info:
        plan_create(body(**{field: value}), allow_network=True)
    assert (info.value.status, info.value.code) == (400, code)
    assert info.value.message


@pytest.mark.parametrize(
    "runtime",
    [
        {"entrypoint": ["python"]},
        {"cmd": ["x"]},
        {"user": "u1"},
        {"log_level": "debug"},
        {"hostname": "h"},
        {"scripts": {"a": "echo"}},
    ],
)
def test_plan_rejects_runtime_options(runtime: dict[str, object]) -> None:
    req = body()
    req = msgspec.structs.replace(req, runtime=msgspec.structs.replace(req.runtime, **runtime))
    with pytest.raises(ApiError) as info:
        plan_create(req, allow_network=True)
    assert info.value.code == "unsupported_field"
    assert f"runtime.{next(iter(runtime))}" in info.value.message


def test_network_mapping() -> None:
    def net(**n: object) -> CreateSandboxRequest:
        req = body()
        return msgspec.structs.replace(req, network=msgspec.structs.replace(req.network, **n))

    deny = {"default_egress": "deny", "default_ingress": "deny", "rules": []}
    allow = {"default_egress": "allow", "default_ingress": "allow", "rules": []}
    assert plan_create(net(policy=deny), allow_network=True).network is False
    assert plan_create(net(enabled=False), allow_network=True).network is False
    assert plan_create(net(policy=allow), allow_network=True).network is True
    with pytest.raises(ApiError) as info:
        plan_create(net(policy=allow), allow_network=False)
    assert info.value.code == "network_unavailable"
    rules = dict(allow, rules=[{"action": "allow", "destination": "example.com"}])
    with pytest.raises(ApiError):
        plan_create(net(policy=rules), allow_network=True)
    with pytest.raises(ApiError):
        plan_create(net(secrets={"entries": [{"name": "K"}]}), allow_network=True)
    empty_secrets = {"entries": [], "violation_action": {"type": "block_and_log"}}
    assert plan_create(net(policy=deny, secrets=empty_secrets), allow_network=True).network is False
