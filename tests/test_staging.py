"""DefaultStager: the behaviours of DCP's test_state_dict_stager.py, ported, plus asyncio ones."""

from __future__ import annotations

import collections
import dataclasses
import gc
import threading
import warnings
from typing import Any, NamedTuple

import anyio
import psutil
import pytest
import torch
from _loopwork import LoopWork

import aiostage
from aiostage.errors import AiostageWarning, ClosedError, LeaseTimeout, StagingError, UsageError

MiB = 1 << 20


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def assert_staged_like(src: Any, out: Any) -> None:
    """Equal values, dtypes, shapes, strides, offsets; on CPU; not sharing the source memory."""
    assert type(out) is type(src)
    if isinstance(src, torch.Tensor):
        assert out.device.type == "cpu"
        assert (out.dtype, out.shape, out.stride()) == (src.dtype, src.shape, src.stride())
        assert torch.equal(out.detach(), src.detach())
        if src.numel():
            assert not same_storage(out, src)
    elif isinstance(src, dict):
        assert list(out) == list(src)
        for k in src:
            assert_staged_like(src[k], out[k])
    elif isinstance(src, list | tuple):
        assert len(out) == len(src)
        for a, b in zip(src, out, strict=True):
            assert_staged_like(a, b)
    else:
        assert out == src


@pytest.fixture
async def stager() -> Any:
    async with aiostage.DefaultStager() as s:
        yield s


# ---------------------------------------------------------------- ported from DCP


async def test_views_share_one_storage(stager: aiostage.DefaultStager) -> None:
    @dataclasses.dataclass
    class Holder:
        view: torch.Tensor
        narrow: torch.Tensor

    t1 = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    t2 = torch.arange(8, dtype=torch.float32)
    sd = {"t1": t1, "h": Holder(t1.view(16), t2.narrow(0, 2, 4)), "t2": t2}
    out = await stager.stage(sd)
    assert same_storage(out["t1"], out["h"].view)
    assert not same_storage(out["t1"], out["t2"])
    assert same_storage(out["t2"], out["h"].narrow)
    assert out["h"].narrow.storage_offset() == 2
    assert torch.equal(out["h"].narrow, t2[2:6])
    assert stager.statistics().bytes_staged == t1.nbytes + t2.nbytes  # two storages, once each


async def test_caching_reuses_buffers_and_shows_new_values(stager: aiostage.DefaultStager) -> None:
    base = torch.ones(64)
    sd = {"base": base, "view": base[8:16]}
    first = await stager.stage(sd)
    ptr = first["base"].data_ptr()
    stager.release(first)
    base.fill_(0)
    second = await stager.stage(sd)
    assert second["base"].data_ptr() == ptr
    assert float(second["view"].sum()) == 0
    stager.release(second)
    base.fill_(42)
    third = await stager.stage(sd)
    assert third["base"].data_ptr() == ptr
    assert torch.all(third["view"] == 42)
    assert stager.statistics().allocations == 1


async def test_tensor_attributes_survive(stager: aiostage.DefaultStager) -> None:
    t = torch.randn(3)
    t.a = 42  # type: ignore[attr-defined]
    t.b = {"nested": [1, 2]}  # type: ignore[attr-defined]
    out = await stager.stage({"t": t})
    assert out["t"].a == 42
    assert out["t"].b == {"nested": [1, 2]}
    assert out["t"].b is not t.b  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
        torch.complex64,
        torch.float8_e4m3fn,
    ],
)
async def test_dtypes_keep_type_and_values(
    stager: aiostage.DefaultStager, dtype: torch.dtype
) -> None:
    src = (torch.randn(5, 7) * 10).to(dtype)
    out = await stager.stage({"x": src})
    assert out["x"].dtype == dtype
    assert torch.equal(out["x"].view(torch.uint8), src.view(torch.uint8))


@pytest.mark.parametrize(
    "config", [{}, {"share_memory": True}, {"reuse_buffers": False}, {"pin_memory": False}]
)
async def test_empty_and_zero_dim_tensors(config: dict[str, bool]) -> None:
    sd = {
        "e1": torch.empty(0),
        "e2": torch.empty(0, 5),
        "e3": torch.empty(2, 0, 3, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
    }
    async with aiostage.DefaultStager(aiostage.StagingOptions(**config)) as stager:
        out = await stager.stage(sd)
    assert_staged_like(sd, out)
    assert out["scalar"].dim() == 0


async def test_complex_storage_sharing(stager: aiostage.DefaultStager) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    sd = {
        "base": base,
        "view": base.view(60),
        "reshape": base.view(10, 6),
        "slice2d": base[1:4, 2:8],
        "column": base[:, 3],
        "slice1d": base.view(60)[5:25],
    }
    out = await stager.stage(sd)
    assert_staged_like(sd, out)
    for k in sd:
        assert same_storage(out[k], out["base"]), k
        assert out[k].storage_offset() == sd[k].storage_offset(), k
    out["base"].fill_(42)
    for k in sd:
        assert torch.all(out[k] == 42), k


async def test_dataclasses_plain_nested_and_frozen(stager: aiostage.DefaultStager) -> None:
    @dataclasses.dataclass
    class Inner:
        w: torch.Tensor
        name: str

    @dataclasses.dataclass(frozen=True)
    class Frozen:
        inner: Inner
        items: list[int]
        count: int
        bias: torch.Tensor

    src = Frozen(Inner(torch.randn(4), "layer"), [1, 2, 3], 7, torch.zeros(2))
    out = await stager.stage({"model": src})
    got = out["model"]
    assert type(got) is Frozen
    assert type(got.inner) is Inner
    assert (got.inner.name, got.items, got.count) == ("layer", [1, 2, 3], 7)
    assert got.items is not src.items
    expected = src.inner.w.clone()
    src.inner.w.add_(1)
    src.bias.fill_(5)
    assert torch.equal(got.inner.w, expected)
    assert torch.all(got.bias == 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.count = 3  # type: ignore[misc]


async def test_cpu_storage_independence(stager: aiostage.DefaultStager) -> None:
    src = torch.randn(1000)
    out = await stager.stage({"x": src})
    assert out["x"].data_ptr() != src.data_ptr()
    snapshot = src.clone()
    src.mul_(-1)
    assert torch.equal(out["x"], snapshot)


@pytest.mark.parametrize("pin", [False, True])
@pytest.mark.parametrize("share", [False, True])
async def test_pinned_and_shared_flags(pin: bool, share: bool) -> None:
    options = aiostage.StagingOptions(pin_memory=pin, share_memory=share)
    async with aiostage.DefaultStager(options) as stager:
        out = await stager.stage({"x": torch.randn(128), "y": torch.randn(3, 3)})
        for t in out.values():
            assert t.is_shared() == share
            assert t.untyped_storage().is_shared() == share
            assert t.is_pinned() == (pin and torch.cuda.is_available())


async def test_no_memory_growth_over_repeated_stages() -> None:
    """The anchor leaked a full copy per save (pytorch/pytorch#170163)."""
    sd = {f"w{i}": torch.randn(MiB) for i in range(32)}  # 128 MiB
    size = sum(t.nbytes for t in sd.values())
    proc = psutil.Process()
    async with aiostage.DefaultStager() as stager:
        for _ in range(3):  # warm-up
            stager.release(await stager.stage(sd))
        gc.collect()
        before = proc.memory_info().rss
        for _ in range(20):
            stager.release(await stager.stage(sd))
        gc.collect()
        growth = proc.memory_info().rss - before
    assert growth < 0.2 * size, f"RSS grew by {growth / MiB:.0f} MiB over 20 stages"
    assert stager.statistics().allocations == 1


# ---------------------------------------------------------------- structure


class Point(NamedTuple):
    x: torch.Tensor
    label: str


async def test_containers_keep_their_types(stager: aiostage.DefaultStager) -> None:
    dd: collections.defaultdict[str, list[int]] = collections.defaultdict(list, a=[1])
    sd = {
        "od": collections.OrderedDict([("b", torch.ones(2)), ("a", torch.zeros(2))]),
        "tuple": (torch.ones(1), 2, "three"),
        "list": [torch.ones(1), None, 1.5, b"raw"],
        "nt": Point(torch.arange(3), "p"),
        "dd": dd,
        "optim": {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.randn(4)}}},
        "dtype": torch.bfloat16,
        "size": torch.Size([2, 3]),
    }
    out = await stager.stage(sd)
    assert_staged_like(sd, out)
    assert list(out["od"]) == ["b", "a"]
    assert out["nt"].label == "p"
    assert out["nt"]._fields == ("x", "label")
    assert out["dd"].default_factory is list
    assert out["dd"]["missing"] == []
    assert type(out["size"]) is torch.Size
    assert 0 in out["optim"]["state"]


async def test_root_can_be_a_tensor_or_a_list(stager: aiostage.DefaultStager) -> None:
    t = torch.randn(5)
    assert torch.equal(await stager.stage(t), t)
    assert_staged_like([t, {"a": t}], await stager.stage([t, {"a": t}]))


async def test_parameters_stay_parameters(stager: aiostage.DefaultStager) -> None:
    model = torch.nn.Linear(4, 3)
    model.bias.requires_grad_(False)
    out = await stager.stage(dict(model.named_parameters()))
    assert type(out["weight"]) is torch.nn.Parameter
    assert out["weight"].requires_grad
    assert not out["bias"].requires_grad
    assert torch.equal(out["weight"], model.weight)


async def test_tied_weights_copied_once(stager: aiostage.DefaultStager) -> None:
    emb = torch.nn.Embedding(100, 16)
    head = torch.nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    sd = {"embed.weight": emb.weight, "lm_head.weight": head.weight}
    sd["embed.alias"] = emb.weight.view(100, 16)  # another object over the same bytes
    out = await stager.stage(sd)
    # one tensor object in, one object out (as DCP's stager keeps it); a view stays a view
    assert out["embed.weight"] is out["lm_head.weight"]
    assert isinstance(out["lm_head.weight"], torch.nn.Parameter)
    assert out["embed.alias"] is not out["embed.weight"]
    assert same_storage(out["embed.alias"], out["embed.weight"])
    assert stager.statistics().bytes_staged == emb.weight.nbytes


async def test_strided_tensors_keep_strides(stager: aiostage.DefaultStager) -> None:
    x = torch.randn(8, 5)
    sd = {
        "t": x.t(),
        "every_other": torch.randn(20)[::2],
        "expanded": torch.randn(3, 1).expand(3, 4),
    }
    out = await stager.stage(sd)
    assert_staged_like(sd, out)


async def test_a_small_slice_of_a_big_tensor_stages_only_the_slice(
    stager: aiostage.DefaultStager,
) -> None:
    big = torch.randn(4 * MiB)
    out = await stager.stage({"head": big[1000:1010]})
    assert torch.equal(out["head"], big[1000:1010])
    assert stager.statistics().bytes_staged <= 10 * 4 + 64


async def test_training_safe_against_optimizer_steps(stager: aiostage.DefaultStager) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    sd = {"model": model.state_dict(), "optim": opt.state_dict()}
    expected = {k: v.clone() for k, v in sd["model"].items()}
    exp_avg = sd["optim"]["state"][0]["exp_avg"].clone()
    out = await stager.stage(sd)
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
    for k, v in expected.items():
        assert torch.equal(out["model"][k], v), k
    assert torch.equal(out["optim"]["state"][0]["exp_avg"], exp_avg)
    assert out["optim"]["param_groups"][0]["lr"] == 0.1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("leaf", "words"),
    [
        (threading.Lock(), "cannot copy"),
        ((i for i in range(3)), "cannot copy"),
        (torch.empty(3, device="meta"), "meta tensor"),
        (torch.randn(4, 4).to_sparse(), "layout"),
    ],
)
async def test_unsupported_leaf_names_its_key(
    stager: aiostage.DefaultStager, leaf: object, words: str
) -> None:
    sd = {"optim": {"state": {3: {"exp_avg": leaf, "ok": torch.ones(1)}}}}
    with pytest.raises(StagingError, match=words) as info:
        await stager.stage(sd)
    assert info.value.key == "optim.state.3.exp_avg"
    assert "optim.state.3.exp_avg" in str(info.value)
    out = await stager.stage({"still": torch.ones(2)})  # the stager stays usable
    assert torch.equal(out["still"], torch.ones(2))


async def test_reference_cycle_is_an_error(stager: aiostage.DefaultStager) -> None:
    sd: dict[str, Any] = {"a": {}}
    sd["a"]["back"] = sd
    with pytest.raises(StagingError, match="cycle"):
        await stager.stage(sd)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="pool_size"):
        aiostage.StagingOptions(pool_size=0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        aiostage.StagingOptions(chunk_bytes=10)
    with pytest.raises(ValueError, match="lease_warning"):
        aiostage.StagingOptions(lease_warning=0)


def test_options_may_be_given_by_keyword() -> None:
    assert aiostage.DefaultStager(pool_size=1).options == aiostage.StagingOptions(pool_size=1)
    base = aiostage.StagingOptions(pin_memory=False, pool_size=3)
    mixed = aiostage.DefaultStager(base, pool_size=1, lease_timeout=2.0).options
    assert mixed == aiostage.StagingOptions(pin_memory=False, pool_size=1, lease_timeout=2.0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['pool_sise'\].*'pool_size'"):
        aiostage.DefaultStager(pool_sise=1)
    with pytest.raises(ValueError, match="pool_size must be at least 1"):
        aiostage.DefaultStager(pool_size=0)


async def test_default_stager_is_an_async_stager() -> None:
    """Used only through the protocol: ``stage`` gives a copy that later changes never reach,
    ``release`` hands its buffer back for the next ``stage``, ``aclose`` ends it (twice too)."""
    sd: dict[str, Any] = {"w": torch.randn(4, 3), "nested": [torch.arange(5)], "step": 7}
    one = aiostage.StagingOptions(pool_size=1, lease_timeout=5)
    stager: aiostage.AsyncStager = aiostage.DefaultStager(one)
    assert isinstance(stager, aiostage.AsyncStager)
    async with stager as entered:
        assert entered is stager
        copy = await stager.stage(sd)
        assert_staged_like(sd, copy)
        sd["w"].add_(1)
        assert not torch.equal(copy["w"], sd["w"])
        stager.release(copy)
        again = await stager.stage(sd)  # one buffer: this returns only because of the release
        assert_staged_like(sd, again)
        assert same_storage(again["w"], copy["w"])
        stager.release(again)
    await stager.aclose()
    with pytest.raises(ClosedError):
        await stager.stage(sd)
    assert not isinstance(_NoRelease(), aiostage.AsyncStager)  # missing a method: refused


class _NoRelease:
    """Stages, but never hands a copy back: not an ``AsyncStager``."""

    async def stage(self, state_dict: Any) -> Any:
        return state_dict

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


# ---------------------------------------------------------------- leases and lifecycle


async def test_pool_backpressure_waits_for_a_release() -> None:
    options = aiostage.StagingOptions(pool_size=1)
    sd = {"w": torch.randn(1000)}
    async with aiostage.DefaultStager(options) as stager:
        first = await stager.stage(sd)
        first_values = first["w"].clone()
        got: list[Any] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _stage_into(stager, sd, got))
            await anyio.wait_all_tasks_blocked()
            assert got == []  # blocked: the only buffer is leased
            sd["w"].add_(1)
            assert torch.equal(first["w"], first_values)  # never overwritten while leased
            stager.release(first)
        assert torch.equal(got[0]["w"], sd["w"])


async def _stage_into(stager: aiostage.DefaultStager, sd: Any, out: list[Any]) -> None:
    out.append(await stager.stage(sd))


async def test_lease_timeout_says_what_to_do() -> None:
    options = aiostage.StagingOptions(pool_size=1, lease_timeout=0.05)
    async with aiostage.DefaultStager(options) as stager:
        await stager.stage({"w": torch.ones(4)})
        with pytest.raises(LeaseTimeout, match="release"):
            await stager.stage({"w": torch.ones(4)})


async def test_a_stage_that_waits_long_for_a_lease_warns_by_default() -> None:
    """Staging twice without a release on a one-copy pool waits forever: say so, and why."""
    assert aiostage.StagingOptions().lease_warning == 10.0
    async with aiostage.DefaultStager(pool_size=1, lease_warning=0.01) as stager:
        first = await stager.stage({"w": torch.ones(4)})
        with pytest.raises(AiostageWarning) as seen:  # the suite turns warnings into errors
            await stager.stage({"w": torch.ones(4)})
        message = str(seen.value)
        assert "all 1 staged copies stayed leased for 0.01 s" in message
        assert "stager.release(staged)" in message
        assert "pool_size" in message
        assert "lease_timeout" in message
        stager.release(first)
        stager.release(await stager.stage({"w": torch.ones(4)}))  # and the stager still works


async def test_the_lease_warning_does_not_end_the_wait() -> None:
    warned = anyio.Event()
    where: list[str] = []

    def show(message: Any, category: Any, filename: str, *args: Any, **kwargs: Any) -> None:
        where.append(filename)
        warned.set()

    sd = {"w": torch.arange(4.0)}
    got: list[Any] = []
    async with aiostage.DefaultStager(pool_size=1, lease_warning=0.01) as stager:
        first = await stager.stage(sd)
        with warnings.catch_warnings():
            warnings.simplefilter("always", AiostageWarning)
            warnings.showwarning = show
            async with anyio.create_task_group() as tg:
                tg.start_soon(_stage_into, stager, sd, got)
                with anyio.fail_after(30):
                    await warned.wait()
                assert got == []  # warned, and still waiting
                stager.release(first)
    assert torch.equal(got[0]["w"], sd["w"])
    assert where == [__file__]  # the warning points at the caller of stage()


async def test_new_layout_gets_new_buffers() -> None:
    async with aiostage.DefaultStager(aiostage.StagingOptions(pool_size=1)) as stager:
        a = await stager.stage({"w": torch.ones(4)})
        stager.release(a)
        b = await stager.stage({"w": torch.ones(4, dtype=torch.float64)})
        assert b["w"].dtype == torch.float64
        assert stager.statistics().allocations == 2
        stager.release(b)
        c = await stager.stage({"w": torch.ones(4), "extra": torch.ones(2)})
        assert torch.equal(c["extra"], torch.ones(2))
        assert stager.statistics().allocations == 3


async def test_release_rejects_foreign_and_double_release(stager: aiostage.DefaultStager) -> None:
    out = await stager.stage({"w": torch.ones(2)})
    with pytest.raises(UsageError, match="not a staged copy"):
        stager.release({"w": torch.ones(2)})
    stager.release(out)
    with pytest.raises(UsageError):
        stager.release(out)


async def test_without_reuse_every_copy_is_fresh_and_owned() -> None:
    options = aiostage.StagingOptions(reuse_buffers=False, pool_size=1)
    async with aiostage.DefaultStager(options) as stager:
        sd = {"w": torch.randn(100)}
        a = await stager.stage(sd)
        b = await stager.stage(sd)  # no backpressure: the caller owns each copy
        assert a["w"].data_ptr() != b["w"].data_ptr()
        stager.release(a)  # a no-op
        assert stager.statistics().allocations == 2


async def test_concurrent_stages_are_independent(stager: aiostage.DefaultStager) -> None:
    sds = [{"w": torch.full((MiB,), float(i)), "i": i} for i in range(2)]
    results: list[Any] = [None, None]

    async def one(i: int) -> None:
        results[i] = await stager.stage(sds[i])

    async with anyio.create_task_group() as tg:
        for i in range(2):
            tg.start_soon(one, i)
    for i in range(2):
        assert torch.all(results[i]["w"] == i)
        assert results[i]["i"] == i
    assert results[0]["w"].data_ptr() != results[1]["w"].data_ptr()


async def test_cancelled_stage_leaves_no_lease_and_the_next_one_works() -> None:
    options = aiostage.StagingOptions(pool_size=1, chunk_bytes=MiB)
    sd = {f"w{i}": torch.randn(8 * MiB) for i in range(4)}  # 128 MiB: many chunks
    async with aiostage.DefaultStager(options) as stager:
        with anyio.move_on_after(0.005) as scope:
            await stager.stage(sd)
        assert scope.cancelled_caught
        stats = stager.statistics()
        assert stats.leased == 0
        assert stats.stages == 0
        out = await stager.stage(sd)  # pool_size=1: the cancelled copy's buffers were given back
        for k, v in sd.items():
            assert torch.equal(out[k], v), k
        assert stager.statistics().allocations == 1


async def test_use_after_close_is_a_clear_error() -> None:
    stager = aiostage.DefaultStager()
    out = await stager.stage({"w": torch.ones(3)})
    await stager.aclose()
    await stager.aclose()  # idempotent
    assert torch.equal(out["w"], torch.ones(3))  # a returned copy stays readable
    with pytest.raises(ClosedError, match="closed"):
        await stager.stage({"w": torch.ones(3)})


async def test_aclose_waits_for_in_flight_and_wakes_waiters() -> None:
    options = aiostage.StagingOptions(pool_size=1)
    stager = aiostage.DefaultStager(options)
    await stager.stage({"w": torch.ones(3)})  # leased, never released
    errors: list[BaseException] = []

    async def waiter() -> None:
        try:
            await stager.stage({"w": torch.ones(3)})
        except ClosedError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        await stager.aclose()
    assert len(errors) == 1


# ---------------------------------------------------------------- the event loop stays free


async def test_loop_keeps_ticking_while_256_mib_stage(stager: aiostage.DefaultStager) -> None:
    """The copies run off the loop's thread, warm and cold: no loop iteration spends more than
    a few ms of that thread's CPU (copying one of these 64 MiB tensors there takes 5-20 ms, the
    whole 256 MiB 20-80 ms). CPU time, not a heartbeat's wall-clock lag: a loaded machine
    stretches the latter whatever runs where.
    """
    sd = {f"w{i}": torch.randn(16 * MiB) for i in range(4)}  # 256 MiB
    stager.release(await stager.stage(sd))
    async with LoopWork() as warm:
        stager.release(await stager.stage(sd))
    async with aiostage.DefaultStager() as fresh, LoopWork() as cold:
        await fresh.stage(sd)
    for work in (warm, cold):
        assert work.iterations >= 3, "the stage never let the loop run"
        assert work.max_cpu < 0.005, f"{work.max_cpu * 1e3:.1f} ms of CPU in one loop iteration"
        assert work.max_calls < 1000, work


async def test_a_dict_of_4096_small_tensors_does_not_stall_the_loop(
    stager: aiostage.DefaultStager,
) -> None:
    """Walking and planning run in the worker thread too, not only the copy: no loop iteration
    makes anything like a call per leaf (about 100 calls at most, whatever the leaf count).
    """
    sd = {"layers": [{"w": torch.randn(4), "step": i} for i in range(4096)]}
    async with LoopWork() as work:
        out = await stager.stage(sd)
    assert torch.equal(out["layers"][4095]["w"], sd["layers"][4095]["w"])
    assert work.iterations >= 2, "the stage never let the loop run"
    assert work.max_calls < 1000, f"{work.max_calls} calls in one loop iteration"
    assert work.max_cpu < 0.005, f"{work.max_cpu * 1e3:.1f} ms of CPU in one loop iteration"


async def test_reserve_prepares_the_first_stage() -> None:
    sd = {"w": torch.randn(1 << 16), "b": torch.randn(7)}
    async with aiostage.DefaultStager(aiostage.StagingOptions(pool_size=2)) as stager:
        await stager.reserve(sd, copies=3)  # at most pool_size
        assert stager.statistics().allocations == 2
        assert stager.statistics().leased == 0
        a, b = await stager.stage(sd), await stager.stage(sd)
        assert stager.statistics().allocations == 2  # both stages found reserved buffers
        assert torch.equal(a["w"], sd["w"])
        assert torch.equal(b["b"], sd["b"])
        stager.release(a)
        stager.release(b)
        await stager.reserve(sd)  # already there: nothing more
        assert stager.statistics().allocations == 2
