"""SSHTransport and ConnectionPool against real sshd hosts on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from infra.config.model import NodeConfig
from infra.errors import (
    AuthFailedError,
    CommandFailedError,
    HostKeyError,
    TransportError,
    TransportTimeoutError,
    UnreachableError,
)
from infra.transport import ConnectionPool, LocalTransport, SSHTransport
from infra.transport.ssh import load_client_key, load_known_hosts
from tests.sshfleet import FleetHost, SSHFleet

pytestmark = pytest.mark.integration

_T = TypeVar("_T")


def arun(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run one coroutine on a fresh event loop."""
    return asyncio.run(coro)


def transport(fleet: SSHFleet, host: FleetHost, **health: Any) -> SSHTransport:
    return SSHTransport(fleet.node_config(host), fleet.health_section(**health))


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True)
    return path


# -- commands ---------------------------------------------------------------------------

def test_runs_as_each_hosts_own_user(ssh_fleet: SSHFleet) -> None:
    async def main() -> list[tuple[str, str]]:
        outputs = []
        for host in ssh_fleet.hosts:
            t = transport(ssh_fleet, host)
            try:
                result = await t.run("whoami; echo $HOME", check=True)
            finally:
                await t.close()
            user, home = result.stdout.split()
            outputs.append((user, home))
        return outputs

    assert arun(main()) == [(h.user, str(h.home)) for h in ssh_fleet.hosts]


def test_sequence_is_quoted_and_string_goes_to_the_shell(ssh_fleet: SSHFleet) -> None:
    async def main() -> tuple[str, str]:
        t = transport(ssh_fleet, ssh_fleet.hosts[0])
        try:
            quoted = await t.run(["printf", "%s|", "a b", "$HOME", "it's", ";true"])
            shell = await t.run("printf '%s|' $HOME")
        finally:
            await t.close()
        return quoted.stdout, shell.stdout

    quoted, shell = arun(main())
    assert quoted == "a b|$HOME|it's|;true|"
    assert shell == f"{ssh_fleet.hosts[0].home}|"


def test_exit_status_input_check_and_timeout(ssh_fleet: SSHFleet) -> None:
    async def main() -> None:
        t = transport(ssh_fleet, ssh_fleet.hosts[0])
        try:
            failed = await t.run("echo oops >&2; exit 3")
            assert (failed.exit_status, failed.signal, failed.stderr) == (3, None, "oops\n")
            assert not failed.ok
            echoed = await t.run("cat", input="hello\nworld")
            assert echoed.stdout == "hello\nworld"
            assert (await t.run("cat")).stdout == ""  # stdin is closed, never a hang
            killed = await t.run("kill -TERM $$")
            assert (killed.exit_status, killed.signal) == (None, "SIGTERM")
            with pytest.raises(CommandFailedError) as info:
                await t.run("exit 4", check=True)
            assert info.value.exit_status == 4 and info.value.node == "node1"
            with pytest.raises(TransportTimeoutError, match=r"timed out after 0\.3 s"):
                await t.run("sleep 30", timeout=0.3)
            assert (await t.run("echo still usable")).stdout == "still usable\n"
        finally:
            await t.close()

    arun(main())


def test_one_connection_is_reused(ssh_fleet: SSHFleet) -> None:
    async def main() -> None:
        t = transport(ssh_fleet, ssh_fleet.hosts[1])
        try:
            assert t.connection is None  # lazy: nothing opened yet
            await t.run("true")
            first = t.connection
            assert first is not None
            for i in range(10):
                assert (await t.run(f"echo {i}")).stdout == f"{i}\n"
                assert t.connection is first
            assert t.connections_opened == 1
        finally:
            await t.close()
        assert t.connection is None

    arun(main())


def test_twenty_concurrent_commands_share_one_connection(ssh_fleet: SSHFleet) -> None:
    async def main() -> None:
        t = transport(ssh_fleet, ssh_fleet.hosts[0])
        try:
            results = await asyncio.gather(*(t.run(f"sleep 0.3; echo {i}") for i in range(20)))
            assert [r.stdout for r in results] == [f"{i}\n" for i in range(20)]
            assert all(r.ok for r in results)
            # many short commands: the channel slots sshd frees late are waited out
            quick = await asyncio.gather(*(t.run("true") for _ in range(200)))
            assert len(quick) == 200 and all(r.ok for r in quick)
            assert t.connections_opened == 1
        finally:
            await t.close()

    arun(main())


def test_without_the_channel_bound_sshd_refuses_extra_sessions(ssh_fleet: SSHFleet) -> None:
    """Why the bound exists: sshd's MaxSessions 10 refuses the 11th concurrent channel.

    (A refused open is retried for about a second; these channels stay busy longer.)
    """
    async def main() -> list[object]:
        host = ssh_fleet.hosts[0]
        t = SSHTransport(ssh_fleet.node_config(host), ssh_fleet.health_section(),
                         max_channels=20)
        try:
            return await asyncio.gather(*(t.run("sleep 2") for _ in range(20)),
                                        return_exceptions=True)
        finally:
            await t.close()

    outcomes = arun(main())
    refused = [o for o in outcomes if isinstance(o, TransportError)]
    assert refused and "channel" in str(refused[0])


# -- files and streams ------------------------------------------------------------------

def test_put_get_round_trip(ssh_fleet: SSHFleet, tmp_path: Path) -> None:
    payload = os.urandom(300_000) + b"\x00\nend"
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    back = tmp_path / "nested" / "back.bin"
    host = ssh_fleet.hosts[2]

    async def main() -> str:
        t = transport(ssh_fleet, host)
        try:
            await t.put(str(src), "~/upload/deep/file.bin")
            remote_sum = await t.run("sha256sum upload/deep/file.bin; stat -c %U upload/deep")
            await t.get(f"{host.home}/upload/deep/file.bin", str(back))
            with pytest.raises(TransportError, match="no-such-file"):
                await t.get("~/no-such-file", str(tmp_path / "x"))
        finally:
            await t.close()
        return remote_sum.stdout

    remote = arun(main())
    digest, _, owner = remote.split()
    assert digest == hashlib.sha256(payload).hexdigest()
    assert owner == host.user
    assert back.read_bytes() == payload


def test_stream_yields_bytes_as_the_command_prints(ssh_fleet: SSHFleet) -> None:
    async def main() -> list[bytes]:
        t = transport(ssh_fleet, ssh_fleet.hosts[0])
        try:
            script = "for i in 1 2 3 4; do printf 'line %s\\n' $i; sleep 0.2; done; printf '\\377'"
            return [chunk async for chunk in t.stream(script)]
        finally:
            await t.close()

    chunks = arun(main())
    assert all(isinstance(c, bytes) for c in chunks)
    assert b"".join(chunks) == b"line 1\nline 2\nline 3\nline 4\n\xff"
    assert len(chunks) >= 2  # pieces arrive as printed, not all at exit


def test_stream_stopped_early_frees_its_channel(ssh_fleet: SSHFleet) -> None:
    async def main() -> str:
        t = SSHTransport(ssh_fleet.node_config(ssh_fleet.hosts[0]),
                         ssh_fleet.health_section(), max_channels=1)
        try:
            gen = t.stream("while true; do echo tick; sleep 0.05; done")
            async for _chunk in gen:
                break
            await gen.aclose()
            return (await t.run("echo free", timeout=10)).stdout
        finally:
            await t.close()

    assert arun(main()) == "free\n"


# -- host keys and credentials ----------------------------------------------------------

def test_unknown_host_key_is_refused_by_default(ssh_fleet: SSHFleet, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    t = transport(ssh_fleet, ssh_fleet.hosts[0], known_hosts=str(known))
    with pytest.raises(HostKeyError, match="unknown host key") as info:
        arun(t.run("true"))
    assert str(known) in str(info.value)
    assert known.read_text() == ""


def test_accept_new_records_the_key_then_verifies_it(ssh_fleet: SSHFleet,
                                                     tmp_path: Path) -> None:
    host = ssh_fleet.hosts[1]
    known = tmp_path / "sub" / "known_hosts"  # neither file nor directory exists yet
    first = transport(ssh_fleet, host, known_hosts=str(known), accept_new_host_keys=True)
    assert arun(first.run("whoami", check=True)).stdout.strip() == host.user
    assert known.read_text() == host.host_key_line() + "\n"
    strict = transport(ssh_fleet, host, known_hosts=str(known))
    assert arun(strict.run("whoami", check=True)).stdout.strip() == host.user


def test_changed_host_key_is_refused_even_with_accept_new(ssh_fleet: SSHFleet,
                                                          tmp_path: Path) -> None:
    host = ssh_fleet.hosts[0]
    other = keygen(tmp_path / "other_host_key").with_suffix(".pub").read_text().split()
    known = tmp_path / "known_hosts"
    content = (f"# comment\n{ssh_fleet.hosts[1].host_key_line()}\n"
               f"[{host.address}]:{host.port} {other[0]} {other[1]}\n")
    known.write_text(content)
    for accept_new in (False, True):
        t = transport(ssh_fleet, host, known_hosts=str(known), accept_new_host_keys=accept_new)
        with pytest.raises(HostKeyError, match="host key changed") as info:
            arun(t.run("true"))
        assert f"{known}:3" in str(info.value)
        assert info.value.node == host.name
    assert known.read_text() == content


def test_wrong_client_key_is_auth_failed(ssh_fleet: SSHFleet, tmp_path: Path) -> None:
    stranger = keygen(tmp_path / "stranger")
    node = ssh_fleet.node_config(ssh_fleet.hosts[0], ssh_key_path=str(stranger))
    t = SSHTransport(node, ssh_fleet.health_section())
    with pytest.raises(AuthFailedError, match="auth failed"):
        arun(t.run("true"))
    missing = ssh_fleet.node_config(ssh_fleet.hosts[0], ssh_key_path=str(tmp_path / "nope"))
    with pytest.raises(AuthFailedError, match="cannot read SSH key"):
        arun(SSHTransport(missing, ssh_fleet.health_section()).run("true"))


def test_ssh_config_alias_user_port_identity_and_proxyjump(ssh_fleet: SSHFleet,
                                                           tmp_path: Path) -> None:
    """A node named only by a ~/.ssh/config alias, and one reached through a jump host."""
    jump, target = ssh_fleet.hosts[0], ssh_fleet.hosts[1]
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host fleet-jump\n  HostName {jump.address}\n  Port {jump.port}\n"
        f"  User {jump.user}\n  IdentityFile {ssh_fleet.client_key}\n"
        f"  UserKnownHostsFile {ssh_fleet.known_hosts}\n"
        f"Host fleet-behind\n  HostName {target.address}\n  Port {target.port}\n"
        f"  User {target.user}\n  IdentityFile {ssh_fleet.client_key}\n"
        f"  ProxyJump fleet-jump\n")

    async def main(alias: str) -> str:
        node = NodeConfig(name=alias, host=alias)  # no user, port 22, no key
        t = SSHTransport(node, ssh_fleet.health_section(), ssh_config=str(config))
        try:
            return (await t.run("whoami; echo $SSH_CONNECTION", check=True)).stdout
        finally:
            await t.close()

    user, *connection = arun(main("fleet-jump")).split()
    assert user == jump.user and connection[2:] == [jump.address, str(jump.port)]
    user, *connection = arun(main("fleet-behind")).split()
    assert user == target.user and connection[2:] == [target.address, str(target.port)]
    jump.stop()  # the route to the target goes through the jump host
    try:
        with pytest.raises(UnreachableError, match="connection refused"):
            arun(main("fleet-behind"))
    finally:
        jump.start()


def test_agent_key_is_used_when_the_node_names_no_key(ssh_fleet: SSHFleet, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        for _ in range(100):
            if subprocess.run(["ssh-add", str(ssh_fleet.client_key)], env=env,
                              capture_output=True).returncode == 0:
                break
            subprocess.run(["sleep", "0.02"], check=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh keys or config to fall back on
        host = ssh_fleet.hosts[2]
        node = ssh_fleet.node_config(host, ssh_key_path=None)
        result = arun(SSHTransport(node, ssh_fleet.health_section()).run("whoami"))
        assert result.stdout.strip() == host.user
    finally:
        agent.kill()
        agent.wait()


def test_keys_and_known_hosts_are_loaded_once(ssh_fleet: SSHFleet) -> None:
    assert load_client_key(ssh_fleet.client_key) is load_client_key(ssh_fleet.client_key)
    assert load_known_hosts(ssh_fleet.known_hosts) is load_known_hosts(ssh_fleet.known_hosts)


# -- node failures ----------------------------------------------------------------------

def test_stopped_sshd_is_connection_refused(ssh_fleet: SSHFleet) -> None:
    host = ssh_fleet.hosts[2]
    t = transport(ssh_fleet, host)
    host.stop()
    try:
        with pytest.raises(UnreachableError, match="connection refused") as info:
            arun(t.run("true"))
        assert info.value.node == host.name
    finally:
        host.start()


def test_reconnects_transparently_after_sshd_restart(ssh_fleet: SSHFleet) -> None:
    host = ssh_fleet.hosts[2]

    async def main() -> None:
        t = transport(ssh_fleet, host)
        try:
            await t.run("true")
            before = t.connection
            host.stop()  # kills sshd and the connection it served
            host.start()
            assert (await t.run("whoami")).stdout.strip() == host.user
            assert t.connection is not before
            assert t.connections_opened == 2
        finally:
            await t.close()

    try:
        arun(main())
    finally:
        host.start()


FROZEN = {"timeout_seconds": 3.0, "keepalive_seconds": 1.0, "keepalive_count_max": 2}


@pytest.mark.timeout(30)
def test_frozen_node_errors_within_the_keepalive_bound(ssh_fleet: SSHFleet) -> None:
    """An open connection, a running command and a new connection all fail, none hangs."""
    host = ssh_fleet.hosts[1]

    async def main() -> list[BaseException]:
        t = transport(ssh_fleet, host, **FROZEN)
        errors: list[BaseException] = []
        try:
            await t.run("true")
            running = asyncio.ensure_future(t.run("sleep 1; echo late"))
            await asyncio.sleep(0.2)
            host.pause()
            try:
                await running
            except TransportError as exc:
                errors.append(exc)
            # two calls racing to reconnect share one attempt (one timeout, not two)
            outcomes = await asyncio.gather(t.run("true"), t.run("true"),
                                            return_exceptions=True)
            errors.extend(o for o in outcomes if isinstance(o, BaseException))
            assert t.connections_opened == 1
        finally:
            host.resume()
            await t.close()
        return errors

    try:
        errors = arun(main())
    finally:
        host.resume()
    assert len(errors) == 3
    assert all(isinstance(e, (TransportTimeoutError, UnreachableError)) for e in errors)
    assert all(isinstance(e, TransportError) and e.node == host.name for e in errors)
    # and the node is usable again once it thaws
    assert arun(transport(ssh_fleet, host).run("whoami")).stdout.strip() == host.user


# -- pool -------------------------------------------------------------------------------

def test_pool_hands_out_one_transport_per_node(ssh_fleet: SSHFleet) -> None:
    nodes = [ssh_fleet.node_config(h) for h in ssh_fleet.hosts]
    local = NodeConfig(name="host", host="localhost")

    async def main() -> None:
        async with ConnectionPool(ssh_fleet.health_section()) as pool:
            transports = [await pool.get(n) for n in nodes]
            assert all(isinstance(t, SSHTransport) for t in transports)
            assert [await pool.get(n) for n in nodes] == transports
            users = await asyncio.gather(*(t.run("whoami") for t in transports))
            assert [u.stdout.strip() for u in users] == [h.user for h in ssh_fleet.hosts]
            assert isinstance(await pool.get(local), LocalTransport)
            moved = await pool.get(ssh_fleet.node_config(ssh_fleet.hosts[0], ram_gb=4.0))
            assert moved is not transports[0]  # config changed: fresh transport
            assert transports[0].connection is None  # and the old one was closed
            ssh = transports[1]
            assert isinstance(ssh, SSHTransport) and ssh.connection is not None
        assert ssh.connection is None and "node2" not in pool

    arun(main())


def test_aes_gcm_is_preferred_unless_the_ssh_config_names_ciphers(ssh_fleet: SSHFleet,
                                                                  tmp_path: Path) -> None:
    """The cheaper cipher for the many small calls of a watch; a config's choice stands."""
    host = ssh_fleet.hosts[0]

    async def cipher(ssh_config: str | None) -> str:
        t = SSHTransport(ssh_fleet.node_config(host), ssh_fleet.health_section(),
                         ssh_config=ssh_config)
        try:
            await t.run("true", check=True)
            assert t.connection is not None
            return str(t.connection.get_extra_info("send_cipher"))
        finally:
            await t.close()

    assert arun(cipher(None)) == "aes128-gcm@openssh.com"
    plain = tmp_path / "plain_config"
    plain.write_text("Host elsewhere\n  User nobody\n")
    assert arun(cipher(str(plain))) == "aes128-gcm@openssh.com"
    chosen = tmp_path / "ciphers_config"
    chosen.write_text("Ciphers chacha20-poly1305@openssh.com\n")
    assert arun(cipher(str(chosen))) == "chacha20-poly1305@openssh.com"
