"""The pipelined Gluon decode's buffer-ring protocol (``gluon_decode_ring._decode_ws_kernel``), model-checked on CPU.

The kernel's partitions (a loader, two solvers, with ``value_partition`` a value partition) hand [D, D] tiles
over through a ring of shared-memory buffers and mbarriers whose waits compare phase parities. The GPU tests
(tests/test_gluon_decode.py) run the kernel under one machine's timing; this file replays the same sequence of
waits, copies and arrivals of every partition (a model written from the kernel: the tile order of
``_ws_loader``, the buffer map of ``_slot``, the solvers' and the value partition's waits) under many random
interleavings, with the copies landing at random later times, and checks for every ring order and value mode
(``_ring_order``: 0, 1, 2; value partition none / resident / readback / loads) and 1 to 9 items per program
(1 to 19 with claimed items: ``claim_items``, whose claims pass through a ring of IDS entries) that

- every run finishes (no deadlock),
- every wait is released by the phase it means: a barrier never runs two phases ahead of a waiter (a parity
  wait would then block forever or pass on the wrong phase),
- a buffer is only refilled after its previous tile was read, and every read finds the tile it expects;
- with claimed items, an entry of the claims ring is only rewritten once every partition that reads its claim
  has read it.
"""

import random

import pytest

TRIALS = 300
LOADS_WAIT = True     # value 3: the loader's wait for item 1's h_kk release before item 3's (the kernel's)
CLAIM_FIRST = True    # claim_items: the loader claims item j + 2 before item j's copies (the kernel's)
IDS, CLAIM_AHEAD = 8, 2   # claim_items: the claims ring's entries; the loader claims item j + 2 before item j's copies


class Barrier:
    """An mbarrier with one arrival per phase: ``completed`` phases so far."""

    def __init__(self, name):
        self.name, self.completed = name, 0

    def passes(self, phase):
        """A wait for (0-based) phase ``phase``: its parity wait passes once that phase completed; it must never
        find the barrier two phases ahead (completed > phase + 1)."""
        assert self.completed <= phase + 1, f"{self.name}: waiter for phase {phase} fell behind ({self.completed})"
        return self.completed == phase + 1


def ring_slot(tile, slots, order):
    """``gluon_decode_ring._slot`` in Python: (buffer, use) of tile 2 j (h_kk) / 2 j + 1 (h_kv) of item j."""
    j, is_kv = tile // 2, tile % 2
    if slots == 2:
        return tile % 2, tile // 2
    if order == 2:
        return (2, j) if is_kv else (j % 2, j // 2)
    if order == 0:
        return (1 + j % 2, j // 2) if is_kv else (0, j)
    return (1 + j % 2, j // 2 + j % 2) if is_kv else (2 * (j == 1), j - 1 + (j == 0))


def full_barrier(tile, order):
    """The full barrier of a tile and the phase its waiter waits for (the kernel's full.index(...) and phase)."""
    j, is_kv = tile // 2, tile % 2
    if order == 2:
        return (2, j) if is_kv else (j % 2, j // 2)
    return 2 * (j % 2) + is_kv, j // 2


def loader_groups(count, slots, order, value=0):
    """The loader's tile order (``_ws_loader``; value partition "loads": its h_kk tiles only), as the tiles it
    copies before item 0 and in each item j's turn of its loop (which starts with the claim of item j + 2)."""
    if value == 3:
        return [], [[2 * j] for j in range(count)]
    before = [2 * a for a in range(min(2, count))] if order == 2 else []
    groups = []
    for j in range(count):
        tiles = []
        if order == 2:
            tiles += [2 * j + 1] + ([2 * j + 4] if j + 2 < count else [])
        else:
            if order != 1 or j != 1:
                tiles.append(2 * j)
            if order == 1 and j == 0 and count > 1:
                tiles.append(2)
            tiles.append(2 * j + 1)
        groups.append(tiles)
    return before, groups


def loader_tiles(count, slots, order, value=0):
    before, groups = loader_groups(count, slots, order, value)
    return before + [tile for tiles in groups for tile in tiles]


def run(count, slots, order, value, rng, claims=False, ahead=False):
    """One random interleaving of a program with ``count`` items. claims: the items are claimed (the claims
    ring's protocol: every partition reads its positions' claims, the first invalid one ending its loop);
    ahead: the solvers read item j + 2's claim when item j starts (inputs_ahead), else when it ends."""
    assert not claims or value < 2
    full = [Barrier(f"full[{i}]") for i in range(4)]
    free = [Barrier(f"free[{i}]") for i in range(slots)]
    mixed_full = [Barrier(f"mixed_full[{i}]") for i in range(2)]
    mixed_free = [Barrier(f"mixed_free[{i}]") for i in range(2)]
    buffers = [("empty", None)] * slots       # (state, tile): "landing", "full", "read" or "empty"
    mixed = [None, None]
    landing = []                              # copies issued, not yet landed
    ids_full = [Barrier(f"ids_full[{i}]") for i in range(IDS)]
    unread = {}                               # claim position -> the partitions that have still to read it

    def readers(position):   # who reads a position's claim: its solver up to its first invalid one (count or
        who = {f"solver {position % 2}"} if position <= count + 1 else set()         # count + 1), the value
        return who | ({"value"} if value and position <= count else set())           # partition up to count

    def claim(position):     # ``_claim``: write the ring entry, announce it
        if position >= IDS:
            assert not unread[position - IDS], f"claims entry rewritten before {unread[position - IDS]} read it"
        unread[position] = readers(position)
        ids_full[position % IDS].completed += 1

    def item_at(position, reader):    # ``_item_at``: wait for the claim, read it; valid while position < count
        while not ids_full[position % IDS].passes(position // IDS):
            yield
        assert reader in unread[position], (reader, position)
        unread[position].discard(reader)

    def take(tile):     # wait for the tile, read it, release the buffer (``_take_tile``)
        index, phase = full_barrier(tile, order)
        while not full[index].passes(phase):
            yield
        slot, _ = ring_slot(tile, slots, order)
        assert buffers[slot] == ("full", tile), (tile, buffers[slot])
        buffers[slot] = ("read", tile)
        free[slot].completed += 1

    def copy(tile):
        while LOADS_WAIT and value == 3 and tile == 6 and not free[2].passes(0):   # item 3's h_kk: item 1's read
            yield
        slot, use = ring_slot(tile, slots, order)
        while use > 0 and not free[slot].passes(use - 1):
            yield
        assert buffers[slot][0] in ("empty", "read"), (tile, buffers[slot])
        buffers[slot] = ("landing", tile)
        landing.append((slot, tile, False))
        yield

    def loader():
        before, groups = loader_groups(count, slots, order, value)
        if claims:
            for position in range(CLAIM_AHEAD):
                claim(position)
                yield
        for tile in before:
            yield from copy(tile)
        for j, tiles in enumerate(groups):
            if claims and CLAIM_FIRST:   # (after them, item 1's h_kv would wait for solver 1, which waits for
                claim(j + CLAIM_AHEAD)   # claim 3 before it takes item 1's h_kk: a deadlock)
                yield
            for tile in tiles:
                yield from copy(tile)
            if claims and not CLAIM_FIRST:
                claim(j + CLAIM_AHEAD)
                yield

    def solver(which):
        if claims:
            yield from item_at(which, f"solver {which}")
        for j in range(which, count, 2):
            if claims and ahead:
                yield from item_at(j + 2, f"solver {which}")
            yield from take(2 * j)
            yield                                                          # the solve
            if value:
                while j >= 2 and not mixed_free[which].passes(j // 2 - 1):
                    yield
                mixed[which] = j
                mixed_full[which].completed += 1
            else:
                yield from take(2 * j + 1)
            if claims and not ahead:
                yield from item_at(j + 2, f"solver {which}")

    def value_partition():
        def wait_mixed(j):     # item j's q', from its solver
            while not mixed_full[j % 2].passes(j // 2):
                yield
            assert mixed[j % 2] == j

        def copy_own(j):       # value 3: the partition's own cp.async of item j's h_kv (no full barrier)
            slot, _ = ring_slot(2 * j + 1, slots, order)
            assert buffers[slot][0] in ("empty", "read"), (j, buffers[slot])
            buffers[slot] = ("landing", 2 * j + 1)
            landing.append((slot, 2 * j + 1, True))

        if value == 3:     # items 0 and 1's h_kv first (1's once buffer 2's h_kk was read), then j + 2's after j
            for ahead in range(min(2, count)):
                slot, use = ring_slot(2 * ahead + 1, slots, order)
                while use > 0 and not free[slot].passes(use - 1):
                    yield
                copy_own(ahead)
                yield
            for j in range(count):
                slot, _ = ring_slot(2 * j + 1, slots, order)
                while buffers[slot] != ("full", 2 * j + 1):     # wait_group on its own copies
                    yield
                yield from wait_mixed(j)
                buffers[slot] = ("read", 2 * j + 1)
                mixed_free[j % 2].completed += 1
                if j + 2 < count:
                    copy_own(j + 2)
        elif value == 2:     # h_kv' at once (item j + 1's before item j's o), o later from it read back
            if count:
                yield from take(1)
            for j in range(count):
                if j + 1 < count:
                    yield from take(2 * j + 3)
                yield from wait_mixed(j)
                mixed_free[j % 2].completed += 1
        else:              # the tile stays until o: wait for it, then for q', read both, release both
            for j in range(count + claims):
                if claims:
                    yield from item_at(j, "value")
                    if j == count:
                        break
                index, phase = full_barrier(2 * j + 1, order)
                while not full[index].passes(phase):
                    yield
                yield from wait_mixed(j)
                slot, _ = ring_slot(2 * j + 1, slots, order)
                assert buffers[slot] == ("full", 2 * j + 1), (j, buffers[slot])
                buffers[slot] = ("read", 2 * j + 1)
                free[slot].completed += 1
                mixed_free[j % 2].completed += 1

    partitions = [loader(), solver(0), solver(1)] + ([value_partition()] if value else [])
    live = list(partitions)
    for _ in range(100_000):
        if not live and not landing:
            assert not any(unread.values()), f"claims never read: {unread}"
            return
        if landing and (not live or rng.random() < 0.3):      # a copy lands (in any order)
            slot, tile, own = landing.pop(rng.randrange(len(landing)))
            buffers[slot] = ("full", tile)
            if not own:       # the loader's copies arrive on the tile's full barrier
                index, _ = full_barrier(tile, order)
                full[index].completed += 1
            continue
        partition = rng.choice(live)
        try:
            next(partition)
        except StopIteration:
            live.remove(partition)
    raise AssertionError(f"deadlock: count={count}, slots={slots}, order={order}, value={value}")


@pytest.mark.parametrize("slots, order, value", [
    (2, 0, 0), (3, 0, 0), (3, 1, 0),            # without a value partition: two buffers, the mirror's, EARLY
    (2, 0, 1), (3, 0, 1), (3, 1, 1),            # value_partition=True
    (3, 2, 2),                                  # value_partition="readback"
    (3, 1, 3),                                  # value_partition="loads"
])
def test_every_interleaving_finishes_with_the_right_tiles(slots, order, value):
    rng = random.Random(slots * 100 + order * 10 + value)
    for count in range(1, 10):
        for _ in range(TRIALS):
            run(count, slots, order, value, rng)


@pytest.mark.parametrize("slots, order, value, ahead", [
    (3, 1, 1, True),      # the default above num_iter 10: value partition, inputs ahead
    (3, 0, 0, False),     # the default up to it (the mirror's order)
    (2, 0, 0, True), (3, 1, 0, False), (2, 0, 1, False), (3, 0, 1, True),
])
def test_claimed_items_every_interleaving(slots, order, value, ahead):
    """claim_items: the claims ring (IDS entries) turns over several times (up to 19 items and 21 claims), and
    no entry is rewritten before its readers have read it."""
    rng = random.Random(slots * 1000 + order * 100 + value * 10 + ahead)
    for count in range(0, 20):
        for _ in range(TRIALS // 2):
            run(count, slots, order, value, rng, claims=True, ahead=ahead)


def test_the_model_catches_a_short_claims_ring(monkeypatch):
    """The check has teeth: with a ring of 2 entries the loader rewrites a claim a solver has yet to read."""
    monkeypatch.setitem(globals(), "IDS", 2)
    with pytest.raises(AssertionError, match="claims entry rewritten|fell behind"):
        rng = random.Random(2)
        for _ in range(TRIALS):
            run(8, 3, 1, 1, rng, claims=True, ahead=True)


def test_the_model_catches_a_claim_after_the_copies(monkeypatch):
    """The check has teeth: a claim after item j's copies deadlocks (solver 1 waits for claim 3 before it takes
    item 1's h_kk; the loader's copy of item 1's h_kv, before claim 3, waits for that take)."""
    monkeypatch.setitem(globals(), "CLAIM_FIRST", False)
    with pytest.raises(AssertionError, match="deadlock"):
        rng = random.Random(3)
        for _ in range(TRIALS):
            run(2, 3, 1, 1, rng, claims=True, ahead=True)


def test_the_model_catches_a_broken_order():
    """The check has teeth: item 1's h_kk early into buffer 2 but with the kv use numbers of order 0 (no extra
    use of buffer 2) refills buffer 2 before item 1's h_kk was read."""
    original = ring_slot

    def broken(tile, slots, order):
        if order == 1 and tile % 2 == 1:
            j = tile // 2
            return 1 + j % 2, j // 2
        return original(tile, slots, order)

    globals()["ring_slot"] = broken
    try:
        with pytest.raises(AssertionError):
            rng = random.Random(0)
            for _ in range(TRIALS):
                run(4, 3, 1, 0, rng)
    finally:
        globals()["ring_slot"] = original


def test_the_model_catches_item_3_loaded_too_early_with_loads(monkeypatch):
    """Without the loader's wait for item 1's h_kk release, item 3's h_kk (value partition "loads": no h_kv tile
    in between) can land on solver 1's full barrier before solver 1 waited for item 1's: two phases ahead."""
    monkeypatch.setitem(globals(), "LOADS_WAIT", False)
    with pytest.raises(AssertionError, match="fell behind"):
        rng = random.Random(1)
        for _ in range(TRIALS):
            run(6, 3, 1, 3, rng)
