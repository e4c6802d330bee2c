"""The pipelined Gluon decode's buffer-ring protocol (``gluon_decode_ring._decode_ws_kernel``), model-checked on CPU.

The kernel's partitions (a loader, two solvers, with ``value_partition`` a value partition) hand [D, D] tiles
over through a ring of shared-memory buffers and mbarriers whose waits compare phase parities. The GPU tests
(tests/test_gluon_decode.py) run the kernel under one machine's timing; this file replays the same sequence of
waits, copies and arrivals of every partition (a model written from the kernel: the tile order of
``_ws_loader``, the buffer map of ``_slot``, the solvers' and the value partition's waits) under many random
interleavings, with the copies landing at random later times, and checks for every ring order and value mode
(``_ring_order``: 0, 1, 2; value partition none / resident / readback / loads) and 1 to 9 items per program that

- every run finishes (no deadlock),
- every wait is released by the phase it means: a barrier never runs two phases ahead of a waiter (a parity
  wait would then block forever or pass on the wrong phase),
- a buffer is only refilled after its previous tile was read, and every read finds the tile it expects.
"""

import random

import pytest

TRIALS = 300
LOADS_WAIT = True     # value 3: the loader's wait for item 1's h_kk release before item 3's (the kernel's)


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


def loader_tiles(count, slots, order, value=0):
    """The loader's tile order (``_ws_loader``; value partition "loads": its h_kk tiles only)."""
    if value == 3:
        return [2 * j for j in range(count)]
    tiles = [2 * a for a in range(min(2, count))] if order == 2 else []
    for j in range(count):
        if order == 2:
            tiles += [2 * j + 1] + ([2 * j + 4] if j + 2 < count else [])
        else:
            if order != 1 or j != 1:
                tiles.append(2 * j)
            if order == 1 and j == 0 and count > 1:
                tiles.append(2)
            tiles.append(2 * j + 1)
    return tiles


def run(count, slots, order, value, rng):
    full = [Barrier(f"full[{i}]") for i in range(4)]
    free = [Barrier(f"free[{i}]") for i in range(slots)]
    mixed_full = [Barrier(f"mixed_full[{i}]") for i in range(2)]
    mixed_free = [Barrier(f"mixed_free[{i}]") for i in range(2)]
    buffers = [("empty", None)] * slots       # (state, tile): "landing", "full", "read" or "empty"
    mixed = [None, None]
    landing = []                              # copies issued, not yet landed

    def take(tile):     # wait for the tile, read it, release the buffer (``_take_tile``)
        index, phase = full_barrier(tile, order)
        while not full[index].passes(phase):
            yield
        slot, _ = ring_slot(tile, slots, order)
        assert buffers[slot] == ("full", tile), (tile, buffers[slot])
        buffers[slot] = ("read", tile)
        free[slot].completed += 1

    def loader():
        for tile in loader_tiles(count, slots, order, value):
            while LOADS_WAIT and value == 3 and tile == 6 and not free[2].passes(0):   # item 3's h_kk: item 1's read
                yield
            slot, use = ring_slot(tile, slots, order)
            while use > 0 and not free[slot].passes(use - 1):
                yield
            assert buffers[slot][0] in ("empty", "read"), (tile, buffers[slot])
            buffers[slot] = ("landing", tile)
            landing.append((slot, tile, False))
            yield

    def solver(which):
        for j in range(which, count, 2):
            yield from take(2 * j)
            yield                                                          # the solve
            if value:
                while j >= 2 and not mixed_free[which].passes(j // 2 - 1):
                    yield
                mixed[which] = j
                mixed_full[which].completed += 1
            else:
                yield from take(2 * j + 1)

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
            for j in range(count):
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
    (3, 2, 1),                                  # value_partition="single" (the resident tile, order 2)
])
def test_every_interleaving_finishes_with_the_right_tiles(slots, order, value):
    rng = random.Random(slots * 100 + order * 10 + value)
    for count in range(1, 10):
        for _ in range(TRIALS):
            run(count, slots, order, value, rng)


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
