"""The SDK against a real brokerd (its socket in $AIRLOCK_SOCKET)."""

import asyncio
import io
import time

import pytest

import airlock
from airlock import NotFound, Sandbox
from airlock.aio import AsyncSandbox


def test_commands_run_with_env_cwd_output_callbacks_and_exit_codes():
    with Sandbox.create() as sb:
        seen = []
        r = sb.commands.run(
            "echo $GREETING; pwd; echo oops >&2; exit 3",
            env={"GREETING": "hi"},
            cwd="/tmp",
            on_stdout=seen.append,
        )
        assert r.exit_code == 3
        assert r.stdout == "hi\n/tmp\n"
        assert r.stderr == "oops\n"
        assert "".join(seen) == "hi\n/tmp\n"
        r = sb.commands.run(["python3", "-c", "import sys; print(len(sys.argv))", "a b", "c"])
        assert r.stdout == "3\n"
        r = sb.commands.run("sleep 30", timeout=1)
        assert r.timed_out and r.exit_code == 128 + 9
        r = sb.commands.run("exec nosuchprogram-xyz")
        assert r.exit_code == 127


def test_background_commands_wait_and_kill():
    with Sandbox.create() as sb:
        h = sb.commands.run("sleep 30", background=True)
        time.sleep(0.3)
        h.kill()
        r = h.wait(timeout=20)
        assert r.signal == 9 and r.exit_code == 137
        quick = sb.commands.run("echo done", background=True)
        assert quick.wait(timeout=20).stdout == "done\n"


def test_files_round_trip_and_errors_carry_the_apis_message(tmp_path):
    with Sandbox.create() as sb:
        # The agent's workspace persists across its sandboxes: a directory
        # of this test's own.
        w = f"/workspace/files-{time.time_ns()}"
        sb.files.mkdir(w)
        data = bytes(range(256)) * 4000
        info = sb.files.write(f"{w}/blob.bin", data, mode=0o600)
        assert info.size == len(data) and info.mode == 0o600
        assert sb.files.read(f"{w}/blob.bin") == data
        assert sb.files.read(f"{w}/blob.bin", offset=10, length=3) == data[10:13]
        src = tmp_path / "up.txt"
        src.write_text("streamed from a file\n")
        with open(src, "rb") as f:
            sb.files.write(f"{w}/up.txt", f)
        assert sb.commands.run(f"cat {w}/up.txt").stdout == "streamed from a file\n"
        out = io.BytesIO()
        assert sb.files.read_to(f"{w}/up.txt", out) == 21
        sb.files.mkdir(f"{w}/d/e")
        sb.files.rename(f"{w}/up.txt", f"{w}/d/e/up.txt")
        names = sorted(e.name for e in sb.files.list(w))
        assert names == ["blob.bin", "d"]
        assert sb.files.stat(f"{w}/d").type == "dir"
        sb.files.remove(f"{w}/d", recursive=True)
        assert not sb.files.exists(f"{w}/d")
        with pytest.raises(NotFound) as e:
            sb.files.read("/workspace/nope")
        assert e.value.status == 404 and "/workspace/nope" in e.value.message


def test_snapshots_restore_files_exactly():
    with Sandbox.create() as sb:
        sb.files.write("/workspace/state.txt", "good")
        snap = sb.snapshot("good")
        assert snap.name == "good"
        sb.files.write("/workspace/state.txt", "broken")
        sb.restore("good")
        assert sb.files.read_text("/workspace/state.txt") == "good"
        assert [s.name for s in sb.snapshots()] == ["good"]


def test_watch_sees_changes_made_inside():
    with Sandbox.create() as sb:
        stream = sb.files.watch("/workspace")
        h = sb.commands.run("sleep 0.5; mkdir /workspace/w; rmdir /workspace/w", background=True)
        events = []
        for ev in stream:
            events.append((ev["event"], ev["path"]))
            if ev["event"] == "removed":
                break
        h.wait(timeout=20)
        assert events == [("created", "/workspace/w"), ("removed", "/workspace/w")]


def test_audit_and_a_destroyed_sandbox_is_gone():
    with Sandbox.create() as sb:
        sb.commands.run("true")
        sid = sb.id
    rows = airlock.audit(sandbox=sid, kind="exec")
    assert any(r["action"] == "exit" for r in rows)
    with pytest.raises(NotFound) as e:
        Sandbox.connect(sid)
    assert sid in e.value.message
    assert all(s["id"] != sid for s in airlock.sandboxes())


def test_the_asyncio_variant():
    async def main():
        async with await AsyncSandbox.create() as sb:
            await sb.files.write("/workspace/a.txt", "async")
            r = await sb.commands.run("cat /workspace/a.txt")
            return r.stdout

    assert asyncio.run(main()) == "async"


def test_pty_gives_a_terminal_with_its_size_resizes_and_ctrl_c():
    with Sandbox.create() as sb:
        t = sb.pty.create(["bash", "--norc", "--noprofile", "-i"], rows=30, cols=100)

        def shows(text, since=0):
            deadline = time.time() + 20
            while time.time() < deadline:
                at = t.output.find(text.encode(), since)
                if at >= 0:
                    return at + len(text)
                time.sleep(0.05)
            raise AssertionError(f"never showed {text!r}: {t.output!r}")

        at = shows("$ ")
        t.send_input("stty size\r")
        at = shows("30 100", at)
        t.resize(40, 120)
        time.sleep(0.2)
        t.send_input("stty size\r")
        at = shows("40 120", at)
        t.send_input("sleep 30\r")
        time.sleep(0.5)
        t.send_input(b"\x03")
        t.send_input("echo alive $?\r")
        shows("alive 130", at)
        t.send_input("exit 3\r")
        assert t.wait(timeout=20).exit_code == 3
