"""Data parallelism over the processes (ranks) that `mlx.launch` starts, on one or several machines.

Without a launcher there is one rank and everything runs as in a single process. Under a
launcher, `map_images` (which `images.run`, and so classify / embed / eval / probe features, go
through) gives each rank a contiguous, even share of the input list, runs it there, and gathers
the rows back to rank 0 in input order. Only `mx.distributed` collectives move data between
ranks: arrays of results, and small JSON records (per-image errors, failures) as bytes; never
images, and no shared disk is assumed. Every rank lists the inputs itself: they must be the same
files at the same paths on every machine (checked before any work).

A rank that raises makes every rank raise `DistributedError` naming it, once all have finished
their shares; a rank that dies (killed, or failed before its share) breaks the ring connections,
and the others' collectives fail at once with "connection lost" (`mlx.launch` also terminates the
remaining ranks when one exits with an error). A rank that is stuck while alive is noticed by
the others, once they have finished their own shares: they wait for it `peer_wait` seconds, then
exit with an error, and `mlx.launch` stops the stuck one. Nothing is written by rank 0 in any
of these cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

import mlx.core as mx
import numpy as np

from .errors import AimMlxError, SettingError

GATHER_BYTES = 64 << 20  # rows gathered per round, per rank: bounds the other ranks' memory
WAIT_ENV = "AIM_MLX_RANK_TIMEOUT"  # seconds a rank that is done waits for the others, or "off"
MIN_WAIT_S = 600.0
SLOWER_PEER = 4  # by default a peer may take this many times as long on its (even) share


class DistributedError(AimMlxError, RuntimeError):
    """A rank failed, or the ranks disagree about their inputs; nothing was written."""


@lru_cache(maxsize=1)
def group() -> mx.distributed.Group:
    """The group of all ranks (a group of one without a launcher). Under a launcher that runs
    several ranks on this machine, it also divides the machine's cores between them."""
    world = mx.distributed.init()
    if world.size() > 1:
        _share_cores(_ranks_on_this_machine(world.rank()))
    return world


def rank() -> int:
    return group().rank()


def size() -> int:
    return group().size()


def is_root() -> bool:
    """True on rank 0, the rank that prints and writes (and the only one without a launcher)."""
    return rank() == 0


def tag(message: str) -> str:
    """`message`, prefixed with "rank R/W: " under a launcher (where ranks share one stderr)."""
    return f"rank {rank()}/{size()}: {message}" if size() > 1 else message


def one_process(command: str) -> None:
    """Under mlx.launch with several ranks: DistributedError on every rank, for a job whose ranks
    would each do the whole of it (timings on shared cores, one package written twice)."""
    if size() > 1:
        raise DistributedError(
            f"{command} runs in one process: start it without mlx.launch (classify, embed, eval "
            "and probe share their work between ranks)"
        )


def share(n: int, of_rank: int | None = None) -> range:
    """The indices of `n` inputs that a rank computes: a contiguous block, sizes differing by at
    most one, in rank order (so the gathered blocks are the input order)."""
    r = rank() if of_rank is None else of_rank
    return range(n * r // size(), n * (r + 1) // size())


def _ranks_on_this_machine(my_rank: int) -> int:
    """How many ranks the launcher started on this machine: from MPI's local size, or from the
    ring backend's host file (the ranks that share this rank's IP addresses); else 1."""
    for var in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(var, "").isdecimal():
            return max(1, int(os.environ[var]))
    try:
        with open(os.environ["MLX_HOSTFILE"]) as f:
            hosts = json.load(f)  # one list of "ip:port" per rank
        ips = [{address.rsplit(":", 1)[0] for address in rank_hosts} for rank_hosts in hosts]
        return max(1, sum(1 for rank_ips in ips if rank_ips & ips[my_rank]))
    except (KeyError, OSError, ValueError, TypeError, IndexError, AttributeError):
        return 1


def _share_cores(ranks_here: int) -> None:
    """Divide this machine's cores between its ranks for the CPU runner (`models/cpu_runner.py`),
    unless the user set AIM_MLX_CPU_CORES / AIM_MLX_CPU_STREAMS."""
    from .models.cpu_runner import CORES_ENV, STREAMS_ENV, machine_cores

    if ranks_here < 2:
        return
    cores = os.environ.get(CORES_ENV) or str(max(1, machine_cores() // ranks_here))
    os.environ[CORES_ENV] = cores
    os.environ.setdefault(STREAMS_ENV, str(min(2, int(cores))))


# ---- Collectives -----------------------------------------------------------------------------


@contextmanager
def _collective(what: str):
    """Run collectives: a lost peer becomes a DistributedError; while blocked waiting for peers
    the process has nothing to clean up, so SIGTERM (the launcher stopping it) ends it at once
    instead of waiting for the collective to return."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL) if in_main else None
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, _LostRank) as e:  # the ring backend: "connection to a peer was lost"
        if isinstance(e, _LostRank):  # the parts that did not come (not always one rank's:
            # with three or more ranks a rank relaying a lost one's part sends none of its own)
            other = " or ".join(f"rank {r}/{size()}" for r in e.args)
        else:
            other = f"rank {1 - rank()}/2" if size() == 2 else "another rank"
        raise DistributedError(
            tag(
                f"no answer from {other} while {what}: it failed or was killed (see its "
                "messages). Nothing was written."
            )
        ) from None
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


class _LostRank(Exception):
    pass


MAX_WAIT_S = 1e6  # 11 days; longer timers overflow


def peer_wait() -> float | None:
    """AIM_MLX_RANK_TIMEOUT in seconds; None when it is "off"; 0.0 when unset (automatic)."""
    value = os.environ.get(WAIT_ENV, "").strip().lower()
    if value in ("", "auto"):
        return 0.0
    if value in ("off", "none"):
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= MAX_WAIT_S:  # also refuses nan and inf
        raise SettingError(
            f"{WAIT_ENV}={value!r}: expected a number of seconds above 0 and at most "
            f"{MAX_WAIT_S:.0f}, or 'off' (wait for ever)"
        )
    return seconds


@contextmanager
def _waiting_for_peers(wait: float | None, share_seconds: float):
    """While this rank, its share done, waits in a collective for the others: if they have not
    come within `wait` seconds (0.0: max(MIN_WAIT_S, SLOWER_PEER x this rank's share time)), say
    so and exit with an error, which makes `mlx.launch` stop the rest. A peer that is stuck while
    alive would otherwise keep every rank waiting forever."""
    if wait is None:
        yield
        return
    limit = wait or max(MIN_WAIT_S, SLOWER_PEER * share_seconds)

    def give_up():
        message = (
            f"the other ranks have not finished their shares {limit:.0f} s after this rank "
            f"finished its own (in {share_seconds:.0f} s): one is stuck, or far slower "
            f"({WAIT_ENV}=seconds waits longer). Nothing was written."
        )
        print(f"Error: {tag(message)}", file=sys.stderr, flush=True)
        os._exit(1)  # the main thread is blocked in the collective

    timer = threading.Timer(limit, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _all_gather(x: np.ndarray) -> list[np.ndarray]:
    """Every rank's `x` (the same shape and dtype on all ranks), in rank order.

    A peer that is gone can leave an all_gather returning zeros instead of raising: each part
    carries a check (a marker, its rank and the CRC-32 of its bytes) that is verified here; the
    ranks whose parts fail it are named."""
    data = np.ascontiguousarray(x).view(np.uint8).reshape(-1)
    check = np.frombuffer(b"aim" + bytes([rank() % 256]), np.uint8)
    crc = np.array([zlib.crc32(data)], np.uint32).view(np.uint8)
    sent = np.concatenate([data, check, crc])
    out = np.array(mx.distributed.all_gather(mx.array(sent), stream=mx.cpu))
    parts = out.reshape(size(), -1)
    lost = []
    for r, part in enumerate(parts):
        body, tail = part[: data.size], part[data.size :]
        ok = tail[:4].tobytes() == b"aim" + bytes([r % 256])
        if not ok or tail[4:].view(np.uint32)[0] != zlib.crc32(body):
            lost.append(r)
    if lost:
        raise _LostRank(*lost)
    return [part[: data.size].view(x.dtype).reshape(x.shape) for part in parts]


def _gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's bytes (any lengths), in rank order."""
    lengths = [int(n[0]) for n in _all_gather(np.array([len(data)], np.int64))]
    padded = np.zeros(max(*lengths, 1), np.uint8)
    padded[: len(data)] = np.frombuffer(data, np.uint8)
    parts = _all_gather(padded)
    return [part[:n].tobytes() for part, n in zip(parts, lengths, strict=True)]


def gather_json(record) -> list:
    """Every rank's JSON-serialisable `record`, in rank order (on every rank)."""
    return [json.loads(b) for b in _gather_bytes(json.dumps(record).encode())]


def gather_rows(
    rows: np.ndarray, counts: list[int], into: np.ndarray | None = None
) -> np.ndarray | None:
    """The ranks' `rows` (counts[r] rows of one shape and dtype on rank r) concatenated in rank
    order, on rank 0 (None elsewhere); moved in rounds of at most GATHER_BYTES per rank. Each
    round is written at its place in one array: `into`'s first rows, where rank 0's `rows` are
    already (the rows of `into[:counts[0]]`), or a new array. No second copy is held."""
    row_bytes = max(1, int(np.prod(rows.shape[1:], dtype=np.int64)) * rows.dtype.itemsize)
    step = max(1, GATHER_BYTES // row_bytes)
    offsets = np.cumsum([0, *counts]).tolist()
    out = None
    if is_root():
        out = into if into is not None else np.empty((offsets[-1], *rows.shape[1:]), rows.dtype)
        if not np.may_share_memory(rows, out):
            out[: counts[0]] = rows[: counts[0]]
    for start in range(0, max(counts), step):
        n = min(step, max(counts) - start)
        block = np.zeros((n, *rows.shape[1:]), rows.dtype)
        mine = rows[start : start + n]
        block[: len(mine)] = mine
        gathered = _all_gather(block)
        for r in range(1, len(counts)) if is_root() else ():
            got = gathered[r][: max(0, min(n, counts[r] - start))]
            out[offsets[r] + start : offsets[r] + start + len(got)] = got
    return None if out is None else out[: offsets[-1]]


def _digest(items) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(item.path.encode("utf-8", "surrogatepass") + b"\0")
        h.update(b"!" if item.error else b"\1")
    return h.hexdigest()


def from_root(record):
    """Rank 0's JSON-serialisable `record`, on every rank (`record` itself with one rank)."""
    if size() == 1:
        return record
    with _collective("receiving rank 0's decisions"):
        return gather_json(record if is_root() else None)[0]


def on_any(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (`flag` itself with one rank): a choice
    that every rank must make alike, such as whether there is any image to run the model on."""
    if size() == 1:
        return flag
    with _collective("comparing the inputs"):
        return any(gather_json(bool(flag)))


def on_root(check: Callable[[], object]):
    """`check()` on rank 0 only (preparing the output that rank 0 writes), its failure shared:
    the other ranks stop at once, saying why, instead of finding rank 0 gone later. `check()`'s
    result on rank 0, None elsewhere."""
    if size() == 1:
        return check()
    result = error = None
    if is_root():
        try:
            result = check()
        except AimMlxError as e:
            error = e
    failed = from_root(None if error is None else str(error))
    if error is not None:
        raise error
    if failed is not None:
        raise DistributedError(tag(f"rank 0 stopped before any work: {failed}"))
    return result


def check_same_inputs(items, what: str) -> None:
    """Every rank must have listed the same inputs, in the same order."""
    unreadable = next((f"{it.path}: {it.error}" for it in items if it.error), None)
    with _collective(f"comparing the inputs of {what}"):
        seen = gather_json([len(items), _digest(items), unreadable])
    different = [r for r, s in enumerate(seen) if s[:2] != seen[0][:2]]
    if different:
        r = different[0]
        (n, _, why), (n0, _, why0) = seen[r], seen[0]
        found = f"{n} inputs and rank 0 {n0}" if n != n0 else "other inputs than rank 0"
        if why != why0:  # a file missing (or unreadable) on one machine only: name it
            found += f" (rank {r}: {why})" if why else f" (rank 0: {why0})"
        raise DistributedError(
            tag(
                f"rank {r} found {found}: every machine needs the same images at the same paths "
                "(relative paths are taken from each rank's working folder)"
            )
        )


# ---- Mapping a function over images ----------------------------------------------------------


def map_images(
    fn: Callable[[mx.array], np.ndarray],
    items: list,
    *,
    not_finite: str | None = None,
    size: int = 224,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "images",
    into: np.ndarray | None = None,
) -> Iterator[tuple]:
    """`images.run` over the ranks: on rank 0, (item, row) for every item in input order, with
    rows computed on whichever rank held the item (or (item with .error, None)); on the other
    ranks, nothing (they compute their share and send it to rank 0). Every rank must call it
    with the same items. Without a launcher, exactly `images.run_here`. `into`: an array
    that rank 0 gathers the rows in (the k-th readable item's at `into[k]`), yielding its rows:
    rank 0 then holds the rows once, not gathered and copied again (other ranks ignore it).

    Features for training (the probe) are extracted the same way: rank 0 gets them all.
    """
    from . import images

    settings = dict(
        not_finite=not_finite, size=size, batch_size=batch_size, progress=progress, desc=desc
    )
    if group().size() == 1:
        yield from images.run_here(fn, items, **settings)
        return
    wait = peer_wait()
    check_same_inputs(items, desc)
    mine = items[share(len(items)).start : share(len(items)).stop]
    started = time.monotonic()
    local, errors, failure = _run_share(images.run_here(fn, mine, **settings), len(mine), into)
    shape = [list(local.shape[1:]), local.dtype.str] if local is not None else None
    with _collective(f"gathering the results of {desc}"):
        with _waiting_for_peers(wait, time.monotonic() - started):
            reports = gather_json({"failure": failure, "errors": errors, "shape": shape})
        found = _checked_reports(reports, desc)
        counts = [len(share(len(items), r)) - len(rep["errors"]) for r, rep in enumerate(reports)]
        everything = None
        if found is not None:
            row_shape, dtype = found
            if local is None:
                local = np.zeros((0, *row_shape), np.dtype(dtype))
            everything = gather_rows(local, counts, into if is_root() else None)
    if not is_root():
        return
    yield from _in_input_order(items, reports, everything)


def _run_share(results: Iterator[tuple], count: int, into: np.ndarray | None):
    """Run this rank's share (`results`: `images.run_here`'s (item, row) for its `count` items):
    (its rows, or None without any; {index in the share: error}; why it failed, or None)."""
    local, n, errors, failure = None, 0, {}, None  # this rank's rows, each written once
    try:
        for i, (item, row) in enumerate(results):
            if item.error:
                errors[i] = item.error
                continue
            if local is None:  # rank 0's rows come first: in place in `into` already
                mine_only = into is None or not is_root()
                local = np.empty((count, *row.shape), row.dtype) if mine_only else into
            local[n] = row
            n += 1
    except Exception as e:  # reported by every rank, once all have finished their shares
        if not isinstance(e, AimMlxError):
            traceback.print_exc()
        failure = str(e) if isinstance(e, AimMlxError) else f"{type(e).__name__}: {e}"
    print(tag(f"{n} image{'' if n == 1 else 's'}"), file=sys.stderr, flush=True)
    return (local[:n] if n else None), errors, failure


def _checked_reports(reports: list[dict], desc: str) -> list | None:
    """DistributedError if a rank failed or the ranks' rows differ in shape; else the rows'
    [shape, dtype], None when no rank has any."""
    failed = [(r, rep["failure"]) for r, rep in enumerate(reports) if rep["failure"]]
    if failed:
        r, why = failed[0]
        raise DistributedError(
            f"rank {r}/{group().size()} failed during {desc}: {why}. Nothing was written."
        )
    shapes = {tuple(map(str, rep["shape"])) for rep in reports if rep["shape"]}
    if len(shapes) > 1:
        raise DistributedError(tag(f"the ranks' results have different shapes: {shapes}"))
    return next((rep["shape"] for rep in reports if rep["shape"]), None)


def _in_input_order(items: list, reports: list[dict], rows: np.ndarray | None) -> Iterator[tuple]:
    """(item, row) for every item, its error (`item.error`) set from the ranks' `reports`:
    (item, None) for an error, else the next of the gathered `rows`."""
    next_row = 0
    for r, rep in enumerate(reports):
        for i, global_i in enumerate(share(len(items), r)):
            item = items[global_i]
            item.error = rep["errors"].get(str(i))
            if item.error:
                yield item, None
            else:
                yield item, rows[next_row]
                next_row += 1
