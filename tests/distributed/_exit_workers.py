"""A rank of ``test_exit.py`` run as a user's script runs, to see how its process ends.

``python _exit_workers.py RANK SIZE PORT SCENARIO DESTROY`` joins a gloo group through the store
the test hosts on 127.0.0.1:PORT, runs one scenario with aiostage, prints one JSON line, calls
``destroy_process_group`` when DESTROY is 1, and leaves the interpreter the normal way: no
``os._exit`` (as ``run_world``'s ranks do), so finalization, daemon threads and atexit hooks
run as they do for users. The test asserts exit status 0 and no "terminate called" on stderr.

Scenarios: ``dtensors`` (DTensors staged on a 1-D mesh, ``full_tensor`` collectives: the test
that once aborted at exit), ``replicate`` (a ReplicationStager exchanging three rounds),
``channel`` (a publisher and a subscriber, two versions) and ``stalled`` (the subscriber takes
an offer, reads the frame's first message and stalls, then exits a moment later; the
publisher's send times out and is abandoned to a daemon thread still inside gloo's wait while
the publisher exits: the two exits race).
"""

from __future__ import annotations

import json
import random
import sys
import time
from datetime import timedelta
from typing import Any

import _channel_workers as channel
import _replication_workers as replication
import _staging_workers as staging
import anyio
import torch
import torch.distributed as dist
from torch._C._distributed_c10d import TCPStore  # torch.distributed.TCPStore, typed

import aiostage
from aiostage._channel import notes as wire

#: the publisher's timeout in ``stalled``: its send to the stalled subscriber is abandoned then
STALL_TIMEOUT = 1.0


async def dtensors(rank: int, world: int) -> Any:
    seen = await staging.stage_dtensors_1d(rank, world)
    return seen["shapes"]


async def replicate(rank: int, world: int) -> Any:
    replicas = []
    async with aiostage.ReplicationStager(timeout=30) as stager:
        for step in range(3):
            state = replication.make_state(rank)
            state["step"] = step
            replica = await stager.stage(state)
            replicas.append(replica["step"])
            stager.release(replica)
    return replicas


async def channel_versions(rank: int, world: int) -> Any:
    model = channel.make_model()
    if rank == 0:
        async with aiostage.WeightPublisher(subscribers=[1], timeout=30) as pub:
            await channel.all_live(pub)
            delivered = []
            for version in (1, 2):
                channel.set_version(model, version)
                delivered.append((await pub.publish(model.state_dict(), version)).delivered)
        return delivered
    async with aiostage.WeightSubscriber(target=model, timeout=30) as sub:
        served = await channel.serve(sub, model, last=2)
    return served["versions"]


async def stalled(rank: int, world: int) -> Any:
    if rank == 1:
        offers = wire.Mailbox(dist.group.WORLD, 0, wire.OFFER_TAG)
        offers.post()
        await wire.send_note(dist.group.WORLD, 0, wire.READY_TAG, wire.Note(wire.READY, 0))
        note = await offers.take()
        head = torch.zeros(5, dtype=torch.int64)
        await anyio.to_thread.run_sync(lambda: dist.recv(head, 0, tag=wire.FRAME_TAG))
        await anyio.sleep(STALL_TIMEOUT + random.uniform(0.0, 2.0))  # stalled, then gone
        return note.kind
    model = channel.make_model(1024)  # frames larger than the sockets' buffers
    async with aiostage.WeightPublisher(subscribers=[1], timeout=STALL_TIMEOUT) as pub:
        await channel.all_live(pub)
        channel.set_version(model, 1)
        report = await pub.publish(model.state_dict(), 1)
    return report.dropped


SCENARIOS = {
    "dtensors": dtensors,
    "replicate": replicate,
    "channel": channel_versions,
    "stalled": stalled,
}


def main(argv: list[str]) -> None:
    rank, size, port = (int(a) for a in argv[:3])
    scenario, destroy = argv[3], argv[4] == "1"
    span = timedelta(seconds=60)
    store = TCPStore("127.0.0.1", port, size, False, span)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=span)
    began = time.monotonic()
    result = anyio.run(SCENARIOS[scenario], rank, size)
    print(json.dumps({"result": result, "seconds": time.monotonic() - began}), flush=True)
    if destroy:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
