"""A broken or hostile peer (raw gloo, aiostage's wire format by hand) against replication and
the weight channel: what a receiver refuses, and what it never touches (issue 21)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _hostile_workers as workers
import pytest
import torch

from aiostage.testing import WorldError, run_world

pytestmark = [pytest.mark.distributed]

WORLD_TIMEOUT = 60.0


def refused_as(seen: dict[str, Any] | None, phase: str, *words: str) -> dict[str, Any]:
    """``seen`` (``_seen.error_seen``) is a ``ReplicationError`` naming rank ``peer`` and
    ``phase`` whose message holds each of ``words``."""
    assert seen is not None, "nothing was raised"
    assert "ReplicationError" in seen["classes"], seen
    assert seen["phase"] == phase, seen
    for word in words:
        assert word in seen["message"], (word, seen)
    return seen


# ---------------------------------------------------------------- item 1: what it agreed to


@pytest.mark.timeout(90)
def test_a_tebibyte_replica_is_refused_as_a_header_before_any_allocation() -> None:
    rank0, _ = run_world(workers.replica_of_a_tebibyte, 2, timeout=WORLD_TIMEOUT)
    for what in ("stage", "recover"):
        error = refused_as(rank0[what], "header", "more than this rank accepts", "max_bytes=")
        assert error["peer"] == 1, error
    assert "twice this rank's own state" in rank0["stage"]["message"], rank0
    assert "twice like=" in rank0["recover"]["message"], rank0
    assert (rank0["allocations"], rank0["allocations_back"]) == (0, 0), rank0


@pytest.mark.timeout(90)
def test_partners_of_uneven_size_need_max_bytes() -> None:
    small, _ = run_world(workers.uneven_partners, 2, None, timeout=WORLD_TIMEOUT)
    refused_as(small["error"], "header", "more than this rank accepts", "max_bytes=")
    small, big = run_world(workers.uneven_partners, 2, 100 << 20, timeout=WORLD_TIMEOUT)
    assert (small["error"], small["numel"]) == (None, (80 << 20) // 4), small
    assert (big["error"], big["numel"]) == (None, 64), big


@pytest.mark.timeout(90)
def test_an_honest_publisher_does_not_send_a_subscriber_more_than_it_takes() -> None:
    pub, sub = run_world(workers.honest_but_too_big, 2, timeout=WORLD_TIMEOUT)
    assert pub["dropped"] == [1], pub
    error = refused_as(pub["error"], "send", "more than the 1000 it takes", "not sent")
    assert error["peer"] == 1, error
    error = refused_as(sub["wait_for"], "offer", "65536 bytes", "max_bytes=1000")
    assert error["peer"] == 0, error


# ---------------------------------------------------------------- items 1 and 6: the channel


@pytest.mark.timeout(90)
def test_a_tebibyte_offer_ends_the_stream_and_the_subscriber_keeps_serving() -> None:
    _, seen = run_world(workers.offer_of_a_tebibyte, 2, timeout=WORLD_TIMEOUT)
    refused_as(seen["iterating"], "header", "more than this rank accepts")
    assert "the target's state" in seen["iterating"]["message"], seen
    assert seen["error"] == seen["iterating"], seen  # sub.error: the same
    assert (seen["version"], seen["target"], seen["received_version"]) == (10, 10.0, 10), seen


# ---------------------------------------------------------------- item 5: what it cannot refuse


@pytest.mark.timeout(90)
def test_a_bent_record_is_refused_as_a_header_naming_the_peer() -> None:
    """Items 2-4: malformed attributes, a quantized dtype and an element count past int64 are
    each a ``ReplicationError`` of phase "header" naming rank 1, never a bare ``TypeError`` or
    ``RuntimeError``, and the next good exchange works."""
    rank0, _ = run_world(workers.bent_replicas, 2, timeout=WORLD_TIMEOUT)
    words = {"attrs": "tensor attributes", "qint8": "qint8", "overflow": "int64"}
    for name, word in words.items():
        error = refused_as(rank0[name], "header", word)
        assert error["peer"] == 1, error
    assert rank0["good"] == 1.0, rank0  # the partner's state, staged as its replica


@pytest.mark.timeout(90)
def test_a_payload_longer_than_announced_aborts_the_receiver_inside_gloo() -> None:
    """What docs/replication.md and docs/channel.md say a deployment must plan for: gloo aborts
    the process from its own thread (SIGABRT), which aiostage cannot catch."""
    with pytest.raises(WorldError) as caught:
        run_world(workers.payload_longer_than_announced, 2, timeout=WORLD_TIMEOUT)
    assert caught.value.ranks[0] == 0, caught.value
    assert caught.value.failures[0].signal == "SIGABRT", caught.value


# ---------------------------------------------------------------- items 7 and 8: what lands


@pytest.mark.timeout(90)
def test_a_version_that_does_not_increase_is_refused_and_repeated_refusals_drop_the_publisher() -> (
    None
):
    _, seen = run_world(workers.versions_going_back, 2, timeout=WORLD_TIMEOUT)
    after_5 = seen["after_5"]
    assert (after_5["version"], after_5["target"], after_5["received_version"]) == (10, 10.0, 10)
    assert not after_5["pending"], after_5
    (refusal,) = after_5["refused"]
    refused_as(refusal, "offer", "version 5", "after version 10", "must increase")
    after_11 = seen["after_11"]
    assert (after_11["version"], after_11["target"], after_11["error"]) == (11, 11.0, None)
    end = seen["end"]
    assert (end["version"], end["target"], end["received_version"]) == (11, 11.0, 11), end
    assert [r["message"].split(": ", 1)[1][:18] for r in end["refused"]] == [
        "offered version 5 ",
        "offered version 4 ",
        "offered version 3 ",
        "offered version 2 ",
    ], end
    refused_as(end["error"], "offer", "3 offers in a row were refused", "version 2")


@pytest.mark.timeout(90)
def test_a_malformed_structure_is_refused_as_it_lands_never_pending() -> None:
    _, seen = run_world(workers.malformed_structure, 2, timeout=WORLD_TIMEOUT)
    after_12 = seen["after_12"]
    assert (after_12["version"], after_12["received_version"]) == (10, 10), after_12
    assert not after_12["pending"], f"a malformed version is pending: {after_12}"
    assert seen["applied"] is None, seen  # nothing to apply, so nothing raised
    attrs, tree = after_12["refused"]
    refused_as(attrs, "header")
    refused_as(tree, "header", "structure")
    end = seen["end"]
    assert (end["version"], end["target"], end["error"]) == (13, 13.0, None), end


# ---------------------------------------------------------------- item 9: shared memory


@pytest.fixture
def victims() -> Iterator[tuple[Any, Path]]:
    """Two shared-memory objects no publisher made: a region of this process (torch's
    ``file_system`` sharing, as a DataLoader makes them), and a plain file in /dev/shm, each of
    4,096 bytes of 0x5A; removed afterwards."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    storage: Any = torch.UntypedStorage._new_using_filename_cpu(4096)
    torch.empty(0, dtype=torch.uint8).set_(storage).fill_(0x5A)
    plain = Path(f"/dev/shm/aiostage-test-victim-{uuid.uuid4().hex}")
    plain.write_bytes(b"\x5a" * 4096)
    try:
        yield storage, plain
    finally:
        plain.unlink(missing_ok=True)


@pytest.mark.timeout(90)
def test_a_subscriber_never_touches_shared_memory_that_is_not_the_publishers(
    victims: tuple[Any, Path],
) -> None:
    storage, plain = victims
    handle = bytes(storage._share_filename_cpu_()[1])
    region_file = Path("/dev/shm" + handle.decode())
    before = region_file.stat().st_size
    pub, sub = run_world(
        workers.foreign_shared_memory,
        2,
        handle,
        ("/" + plain.name).encode(),
        timeout=WORLD_TIMEOUT,
    )
    # the objects it does not own: neither grown, nor written, nor removed
    assert region_file.stat().st_size == before == 4096 + 64
    assert torch.equal(torch.empty(0, dtype=torch.uint8).set_(storage), torch.full((4096,), 0x5A))
    assert plain.read_bytes() == b"\x5a" * 4096
    assert pub["own_size"] == pub["region_bytes"] + 64, pub  # its own: not grown either
    # version 1 through shared memory, every other one refused there and sent over gloo
    assert pub["answers"] == ["DONE"] + ["NO_SHM"] * 5, pub
    assert sub["versions"][-1] == 6, sub
    end = sub["end"]
    assert (end["version"], end["target"], end["error"]) == (6, 6.0, None), end
    messages = [refused_as(r, "region")["message"] for r in end["refused"]]
    assert len(messages) == 5, messages
    for message in messages[:3]:  # manager\nhandle: not a region name at all
        assert "is not the name of a shared-memory region" in message, messages
    assert "another process than the publisher's" in messages[3], messages
    assert f"not the {2 * pub['region_bytes']} announced" in messages[4], messages


# ---------------------------------------------------------------- item 10: parsing a header


@pytest.mark.timeout(90)
def test_a_header_longer_than_this_ranks_own_could_need_is_refused_unread() -> None:
    rank0, _ = run_world(workers.header_of_many_lists, 2, 16 << 20, timeout=WORLD_TIMEOUT)
    refused_as(rank0["stage"], "header", "a header of 16777216 bytes is more than")
    # parsing it would have cost ~360 MB; receiving it, 16 MB
    assert rank0["grew"] < 100 << 20, f"peak memory grew by {rank0['grew'] >> 20} MiB"


@pytest.mark.timeout(90)
def test_a_header_of_unknown_structure_is_parsed_within_a_memory_budget() -> None:
    rank0, _ = run_world(workers.header_of_many_dicts, 2, 30 << 20, timeout=WORLD_TIMEOUT)
    refused_as(rank0["recover"], "header", "could take", "bytes of memory")
    # received (30 MB, 90 MB with its copies) but not parsed (~750 MB)
    assert rank0["grew"] < 300 << 20, f"peak memory grew by {rank0['grew'] >> 20} MiB"
