"""Cache-aware placement: the scheduler remembers which worker last held a prompt's blocks and
prefers it (when it has room) for a prompt with that prefix."""

from services.scheduler.block_homes import BlockHomes
from services.scheduler.placement import WorkerLoad, choose_workers
from shared.settings import Settings


def test_the_home_of_the_longest_known_run_of_leading_blocks():
    homes = BlockHomes(max_blocks=3)
    homes.record("w1", ["a", "b"])
    homes.record("w2", ["a", "b", "c"])  # the same prefix, longer, ran on w2 since
    assert homes.home_of(["a", "b", "c", "d"]) == "w2" and homes.home_of(["x"]) is None
    homes.record("w3", ["e"])  # past max_blocks: the least recently recorded goes
    assert len(homes) == 3 and homes.home_of(["a"]) is None and homes.home_of(["a", "b"]) == "w2"


def test_placement_prefers_the_blocks_home_when_it_has_room():
    settings = Settings()
    loads = [WorkerLoad("w1", 0, False, active_requests=0, kv_tokens=0, capacity_tokens=1000),
             WorkerLoad("w2", 1, False, active_requests=2, kv_tokens=500, capacity_tokens=1000)]
    pick = lambda prefer: [w.worker_id for w in choose_workers(100, 8192, loads, settings, True, 10, prefer)]  # noqa: E731
    assert pick(None) == ["w1"]  # the least loaded
    assert pick("w2") == ["w2"]  # its blocks are there
    assert pick("w9") == ["w1"]
    full = [loads[0], WorkerLoad("w2", 1, False, active_requests=2, kv_tokens=950, capacity_tokens=1000)]
    assert [w.worker_id for w in choose_workers(100, 8192, full, settings, True, 10, "w2")] == ["w1"]  # no room
