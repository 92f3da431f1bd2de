"""The direct ingress <-> Instance channel (``scheduler/control/channel.py``): plain asyncio, no Ray, fast.

What the ingress relies on: concurrent calls share one connection (a long poll does not block a snapshot), a
remote error comes back as ``RemoteError``, and anything that makes the channel unusable (wrong token, peer gone,
connection dropped mid-call) is a ``ChannelError`` -- the ingress' signal to retry over Ray. Plus the Instance
side: a poll answer the channel dropped is sent again when the retry says what arrived (``from_index``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bench.loadgen import cluster_config
from scheduler.control.channel import ChannelClient, ChannelError, ChannelServer, RemoteError
from scheduler.control.instance import Instance
from scheduler.engine.base import EngineRequest, SamplingParams

# "no Ray": an Instance built here asked Ray for its node id, which started a local node (~10 s) for nothing.
pytestmark = pytest.mark.usefixtures("no_ray")


class _Methods:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def echo(self, *args: Any, **kwargs: Any) -> Any:
        return args, kwargs

    async def wait(self) -> str:
        await self.release.wait()
        return "released"

    async def boom(self) -> None:
        raise ValueError("max_tokens: must be positive")


async def _server(m: _Methods, token: str = "secret") -> ChannelServer:
    srv = ChannelServer({"echo": m.echo, "wait": m.wait, "boom": m.boom}, token)
    await srv.start("127.0.0.1")
    return srv


@contextlib.asynccontextmanager
async def _connected(m: _Methods, client_token: str = "secret") -> AsyncIterator[ChannelClient]:
    """A server for ``m`` (token "secret") and a client presenting ``client_token``; both closed after."""
    srv = await _server(m)
    cli = ChannelClient(srv.address, client_token)
    try:
        yield cli
    finally:
        cli.close()
        await srv.close()


def test_calls_round_trip_and_long_calls_do_not_block_others() -> None:
    async def scenario() -> None:
        m = _Methods()
        async with _connected(m) as cli:
            assert await cli.call("echo", 1, (2, 3), key="v") == ((1, (2, 3)), {"key": "v"})
            slow = asyncio.create_task(cli.call("wait"))
            await asyncio.sleep(0.05)
            # The parked call holds no lock: 20 more calls complete meanwhile, each with its own answer.
            outs = await asyncio.wait_for(asyncio.gather(*(cli.call("echo", i) for i in range(20))), 5)
            assert [o[0][0] for o in outs] == list(range(20))
            assert not slow.done()
            m.release.set()
            assert await asyncio.wait_for(slow, 5) == "released"

    asyncio.run(scenario())


def test_remote_errors_name_the_error_and_keep_the_connection() -> None:
    async def scenario() -> None:
        async with _connected(_Methods()) as cli:
            with pytest.raises(RemoteError, match="ValueError: max_tokens: must be positive"):
                await cli.call("boom")
            with pytest.raises(RemoteError, match="no method 'shutdown'"):
                await cli.call("shutdown")
            assert await cli.call("echo", "still") == (("still",), {})
            assert not cli.closed

    asyncio.run(scenario())


def test_wrong_token_is_dropped_before_anything_is_unpickled() -> None:
    async def scenario() -> None:
        async with _connected(_Methods(), client_token="not-the-token") as cli:
            with pytest.raises(ChannelError):
                await asyncio.wait_for(cli.call("echo", 1), 5)
            assert cli.closed
            with pytest.raises(ChannelError):  # closed for good: the caller makes a new client
                await cli.call("echo", 1)

    asyncio.run(scenario())


def test_peer_gone_fails_pending_and_new_calls_with_channel_error() -> None:
    async def scenario() -> None:
        srv = await _server(_Methods())
        cli = ChannelClient(srv.address, "secret")
        assert await cli.call("echo", 0) == ((0,), {})
        pending = asyncio.create_task(cli.call("wait"))
        await asyncio.sleep(0.05)
        await srv.close()
        with pytest.raises(ChannelError):
            await asyncio.wait_for(pending, 5)
        with pytest.raises(ChannelError):
            await cli.call("echo", 1)
        # Nothing listens there any more: connecting fails as a ChannelError too.
        with pytest.raises(ChannelError):
            await ChannelClient(srv.address, "secret").call("echo", 2)

    asyncio.run(scenario())


def test_a_peer_that_hangs_up_at_once_fails_calls_promptly() -> None:
    """Accepted, then closed: every call (several at once, racing the connect) ends in ChannelError, none hangs."""

    async def scenario() -> list[bool]:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        srv = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        cli = ChannelClient(f"127.0.0.1:{port}", "t")
        try:
            res = await asyncio.wait_for(
                asyncio.gather(*(cli.call("echo", i) for i in range(5)), return_exceptions=True), 5)
        finally:
            srv.close()
        return [isinstance(r, ChannelError) for r in res]

    assert asyncio.run(scenario()) == [True] * 5
    with pytest.raises(ChannelError):  # a malformed address is a ChannelError too (the caller uses Ray)
        asyncio.run(ChannelClient("no-port-here", "t").call("echo"))


def test_instance_resends_a_poll_answer_that_never_arrived() -> None:
    async def scenario() -> tuple[list[int], list[int], list[int], list[int], list[int]]:
        cfg = cluster_config("channel", mixed=1)
        pool = cfg.pools[0]
        inst = Instance("mixed-0", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs={"time_scale": 0.0})
        await inst.start()
        try:
            assert inst.info.channel and inst.info.channel_token  # served on a channel from start()
            req = EngineRequest("r", tuple(range(1, 65)), SamplingParams(max_tokens=12, ignore_eos=True))
            first = await inst.submit(req)
            got = [t for c in first.chunks for t in c.token_ids]
            await asyncio.sleep(0.2)  # the rest is produced (time_scale 0) and buffered
            lost = await inst.poll("r", 1.0, len(got))  # the final answer is "dropped on the wire"
            assert lost is not None and lost.finished and lost.token_ids
            # The retry says what arrived: the lost part again, although the stream has ended here.
            again = await inst.poll("r", 1.0, len(got))
            assert again is not None and again.finished
            # A caller that has everything learns the request is gone (None), as before.
            gone = await inst.poll("r", 1.0, len(got) + len(again.token_ids))
            assert gone is None

            # Mid-stream: a decode in real time; one non-final answer is lost, the retry resends it merged
            # with whatever came after it.
            inst2 = Instance("mixed-1", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs={"time_scale": 1.0})
            await inst2.start()
            try:
                req2 = EngineRequest("s", tuple(range(1, 65)), SamplingParams(max_tokens=400, ignore_eos=True))
                sub = await inst2.submit(req2)
                have = [t for c in sub.chunks for t in c.token_ids]
                dropped = await inst2.poll("s", 5.0, len(have))
                assert dropped is not None and dropped.token_ids and not dropped.finished
                resent = await inst2.poll("s", 5.0, len(have))
                assert resent is not None and resent.index == len(have)
                await inst2.abort("s")
            finally:
                await inst2.shutdown()
            return got, list(lost.token_ids), list(again.token_ids), list(dropped.token_ids), list(resent.token_ids)
        finally:
            await inst.shutdown()

    got, lost, again, dropped, resent = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert len(got) + len(lost) == 12
    assert again == lost
    assert resent[: len(dropped)] == dropped  # nothing lost: the dropped tokens lead the retry's answer


class _RayMethod:
    """Stands in for ``handle.<method>``: ``.remote()`` returns an awaitable, as an ObjectRef is."""

    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result("via-ray")
        return fut


def _ingress_with_one_member(method: str, channel: str, **ingress_kw: Any) -> tuple[Any, Any, Any, list[Any]]:
    """An Ingress (no Ray, no Controller) whose only member "m-0" (incarnation "inc-1") has ``channel`` and a
    Ray stand-in for ``method``. Returns (ingress, handle, info, the stand-in's calls)."""
    from scheduler.control.controller import Member
    from scheduler.control.ingress import Ingress
    from scheduler.control.instance import InstanceInfo
    from scheduler.core.types import InstanceRole

    calls: list[tuple[Any, ...]] = []
    handle = type("H", (), {method: _RayMethod(calls)})()
    ing = Ingress(cluster_config("one-member", mixed=1), None, **ingress_kw)
    info = InstanceInfo("m-0", "mixed", InstanceRole.MIXED, "a100", 1, "m", "simulated", "inc-1",
                        channel=channel, channel_token="t")
    ing._members = {"m-0": Member(handle, info)}
    return ing, handle, info, calls


def test_ingress_falls_back_to_ray_and_backs_off_a_channel_that_keeps_failing() -> None:
    from scheduler.control.controller import Member
    from scheduler.control.ingress import CHANNEL_RETRY_S

    async def scenario() -> tuple[list[Any], list[float], Any, list[tuple[Any, ...]]]:
        # Nothing listens on port 1: every channel attempt fails to connect.
        ing, handle, info, calls = _ingress_with_one_member("poll", "127.0.0.1:1")
        outs, waits = [], []
        for _ in range(3):
            ing._channel_down.clear()  # let the next call try the channel again at once
            t = time.monotonic()
            outs.append(await ing._call("m-0", handle, "poll", "rid", 1.0, 0, on_retry={"adopt": True}))
            waits.append(ing._channel_down["inc-1"] - t)
        # A working channel again: its first success forgets the failures.
        m = _Methods()
        srv = ChannelServer({"poll": m.echo}, "t")
        await srv.start("127.0.0.1")
        try:
            ing._members = {"m-0": Member(handle, dataclasses.replace(info, channel=srv.address))}
            ing._channel_down.clear()
            ok = await ing._call("m-0", handle, "poll", "rid", 1.0, 0)
            assert "inc-1" not in ing._channel_fails
        finally:
            await ing.close()
            await srv.close()
        return outs, waits, ok, calls

    outs, waits, ok, calls = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert outs == ["via-ray"] * 3
    assert calls[0] == (("rid", 1.0, 0), {"adopt": True})  # the retry says the first call may have run
    assert [round(w / CHANNEL_RETRY_S) for w in waits] == [1, 2, 4]  # doubling while it keeps failing
    assert ok == (("rid", 1.0, 0), {})  # answered on the channel, not by the Ray stand-in


def test_overlapping_polls_of_one_stream_both_answer() -> None:
    """A dropped channel's poll may still be parked on the instance when its Ray retry arrives: two polls wait on
    one stream, the first to wake takes the buffer, the other must wait for more rather than fail."""

    async def scenario() -> tuple[Any, Any]:
        cfg = cluster_config("channel", mixed=1)
        pool = cfg.pools[0]
        inst = Instance("mixed-0", pool, cfg.model, cfg.gpus[pool.gpu], backend_kwargs={"time_scale": 1.0})
        await inst.start()
        try:
            req = EngineRequest("o", tuple(range(1, 65)), SamplingParams(max_tokens=400, ignore_eos=True))
            await inst.submit(req)
            a, b = await asyncio.gather(inst.poll("o", 5.0), inst.poll("o", 5.0))
            await inst.abort("o")
            return a, b
        finally:
            await inst.shutdown()

    a, b = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert a is not None and b is not None and a.token_ids and b.token_ids
    first, second = sorted((a, b), key=lambda c: c.index)
    assert second.index == first.index + len(first.token_ids)  # consecutive, nothing lost between them


def test_ingress_without_direct_channel_uses_ray_only() -> None:
    async def scenario() -> tuple[Any, list[tuple[Any, ...]], int]:
        ing, handle, _, calls = _ingress_with_one_member("snapshot", "127.0.0.1:1", direct=False)
        out = await ing._call("m-0", handle, "snapshot")
        return out, calls, ing.counters["channel_calls"]

    out, calls, channel_calls = asyncio.run(scenario())
    assert out == "via-ray" and calls == [((), {})] and channel_calls == 0


def test_serve_direct_channel_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """``llmsched serve`` turns the channel off with a flag or ``LLMSCHED_DIRECT_CHANNEL=0`` (operators whose
    network blocks pod-to-pod ephemeral ports)."""
    from scheduler import serve

    seen: list[bool] = []

    async def fake_serve(args: Any) -> int:
        seen.append(args.direct_channel)
        return 0

    monkeypatch.setattr(serve, "_serve", fake_serve)
    cfg = str(Path(__file__).resolve().parents[1] / "deploy" / "examples" / "cpu-mixed.yaml")
    assert serve.main(["--config", cfg]) == 0
    assert serve.main(["--config", cfg, "--no-direct-channel"]) == 0
    monkeypatch.setenv("LLMSCHED_DIRECT_CHANNEL", "0")
    assert serve.main(["--config", cfg]) == 0
    assert seen == [True, False, False]
