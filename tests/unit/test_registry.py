"""The scheduler's registry without NATS: the torch.distributed world's members and backend come from
the workers' reported devices (never the scheduler's own), and a world never mixes CPU and CUDA."""

from __future__ import annotations

from shared import codec
from shared.messages import ModelInfo, QueuedRequest, WorkerHeartbeat, WorldForm
from services.scheduler.registry import Registry, device_kind, plan_world

MODEL = ModelInfo(name="demo", vocab_size=300, num_layers=2, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=512, dtype="float32")


def beat(worker_id: str, device: str = "cpu", draining: bool = False) -> WorkerHeartbeat:
    return WorkerHeartbeat(worker_id=worker_id, device=device, model=MODEL, store_addr=f"{worker_id}:29500",
                           world_generation=0, world_rank=None, busy=False, active_requests=0, kv_tokens=0,
                           draining=draining)


def registry(*beats: WorkerHeartbeat, now: float = 100.0) -> Registry:
    reg = Registry(timeout_s=5.0)
    for b in beats:
        reg.on_worker(b, now=now)
    return reg


def test_all_cpu_workers_form_a_gloo_world():
    reg = registry(beat("w-b"), beat("w-a"))
    assert reg.world_needs_reform()
    form = reg.next_world()
    assert (form.backend, form.members, form.generation) == ("gloo", ["w-a", "w-b"], 1)
    assert form.store_addr == "w-a:29500"  # member 0 hosts the rendezvous
    assert reg.backend == "gloo" and not reg.world_needs_reform()


def test_all_cuda_workers_form_an_nccl_world():
    reg = registry(beat("w-a", "cuda"), beat("w-b", "cuda"), beat("w-c", "cuda:1"))
    form = reg.next_world()
    assert (form.backend, form.members) == ("nccl", ["w-a", "w-b", "w-c"])
    assert not reg.world_needs_reform()


def test_the_backend_does_not_depend_on_the_schedulers_settings(monkeypatch):
    monkeypatch.setenv("RINGSERVE_DEVICE", "cpu")
    assert registry(beat("w-a", "cuda"), beat("w-b", "cuda")).next_world().backend == "nccl"
    monkeypatch.setenv("RINGSERVE_DEVICE", "cuda")
    assert registry(beat("w-a"), beat("w-b")).next_world().backend == "gloo"


def test_device_kind():
    assert [device_kind(d) for d in ("cuda", "cuda:3", "cpu")] == ["cuda", "cuda", "cpu"]


def test_mixed_devices_the_kind_with_most_live_workers_forms_the_world():
    reg = registry(beat("w-g1", "cuda"), beat("w-c1"), beat("w-c2"))
    form = reg.next_world()
    assert (form.backend, form.members) == ("gloo", ["w-c1", "w-c2"])
    plan = reg.world_plan()
    assert plan.excluded == ("w-g1",) and dict(plan.counts) == {"cpu": 2, "cuda": 1}
    # The excluded worker does not keep asking for a new world, and has no rank.
    assert not reg.world_needs_reform()
    for w in ("w-c1", "w-c2"):
        reg.on_ready(w, form.generation, True)
    assert reg.world_ready and reg.world_rank("w-c2") == 1 and reg.world_rank("w-g1") is None

    reg = registry(beat("w-g1", "cuda"), beat("w-g2", "cuda"), beat("w-c1"))
    form = reg.next_world()
    assert (form.backend, form.members) == ("nccl", ["w-g1", "w-g2"])


def test_mixed_devices_a_tie_goes_to_cuda():
    reg = registry(beat("w-c1"), beat("w-g1", "cuda"), beat("w-c2"), beat("w-g2", "cuda"))
    form = reg.next_world()
    assert (form.backend, form.members) == ("nccl", ["w-g1", "w-g2"])
    assert reg.world_plan().excluded == ("w-c1", "w-c2")


def test_draining_workers_count_for_no_device():
    reg = registry(beat("w-g1", "cuda"), beat("w-c1"), beat("w-c2", draining=True))
    assert reg.next_world().members == ["w-g1"]  # 1 cuda vs 1 live cpu: the tie goes to cuda


def test_a_worker_joining_or_leaving_makes_a_new_generation():
    reg = registry(beat("w-a"), beat("w-b"))
    assert reg.next_world().generation == 1
    reg.on_worker(beat("w-c"), now=101.0)  # joins
    assert reg.world_needs_reform()
    form = reg.next_world()
    assert (form.generation, form.members, form.backend) == (2, ["w-a", "w-b", "w-c"], "gloo")
    # w-b falls silent: the sweep drops it, the next world leaves it out.
    reg.on_worker(beat("w-a"), now=104.0)
    reg.on_worker(beat("w-c"), now=104.0)
    assert reg.sweep(now=106.5) == ["w-b"]
    assert reg.world_needs_reform()
    form = reg.next_world()
    assert (form.generation, form.members) == (3, ["w-a", "w-c"])
    # Readiness of an old generation no longer counts.
    reg.on_ready("w-a", 2, True)
    assert reg.ready == set()


def test_a_change_of_majority_device_changes_backend_and_generation():
    reg = registry(beat("w-g1", "cuda"), beat("w-c1"))
    form = reg.next_world()
    assert (form.generation, form.backend, form.members) == (1, "nccl", ["w-g1"])
    reg.on_worker(beat("w-c2"), now=100.0)  # CPU workers now outnumber the GPU one
    assert reg.world_needs_reform()
    form = reg.next_world()
    assert (form.generation, form.backend, form.members) == (2, "gloo", ["w-c1", "w-c2"])


def test_a_cpu_worker_joining_a_larger_cuda_world_forms_no_new_generation():
    reg = registry(beat("w-g1", "cuda"), beat("w-g2", "cuda"))
    reg.next_world()
    reg.on_worker(beat("w-c1"), now=100.0)
    assert not reg.world_needs_reform()


def test_no_live_workers_no_world():
    reg = registry()
    assert reg.world_plan() is None and reg.next_world() is None and reg.generation == 0
    assert plan_world([]) is None


def test_device_exclusions_are_reported_once_per_change():
    reg = registry(beat("w-c1"), beat("w-c2"))
    assert reg.device_change() is None  # uniform from the start: nothing to say
    reg.on_worker(beat("w-g1", "cuda"), now=100.0)
    plan = reg.device_change()
    assert plan.excluded == ("w-g1",) and plan.backend == "gloo"
    assert reg.device_change() is None  # said once
    reg.on_worker(beat("w-g2", "cuda"), now=100.0)  # tie: cuda wins, the CPU workers are now out
    plan = reg.device_change()
    assert plan.excluded == ("w-c1", "w-c2") and plan.backend == "nccl"
    assert reg.device_change() is None
    reg.on_worker(beat("w-c1", draining=True), now=100.0)
    reg.on_worker(beat("w-c2", draining=True), now=100.0)
    plan = reg.device_change()  # uniform again: reported once, with nothing excluded
    assert plan.excluded == () and plan.backend == "nccl"
    assert reg.device_change() is None


def test_heartbeats_and_world_form_round_trip_the_bus_codec():
    b = beat("w-a", "cuda")
    assert codec.decode(codec.encode(b), WorkerHeartbeat).device == "cuda"
    form = registry(b).next_world()
    assert codec.decode(codec.encode(form), WorldForm).backend == "nccl"


def test_a_restarted_scheduler_numbers_its_worlds_above_the_workers_generations():
    # The workers joined generation 7 of the scheduler before; this one starts counting at 0.
    reg = registry(beat("w-a").model_copy(update={"world_generation": 7}),
                   beat("w-b").model_copy(update={"world_generation": 6}))
    assert reg.next_world().generation == 8
    assert reg.next_world().generation == 9  # and on from its own count


def test_every_instance_of_every_service_is_listed_until_it_goes_silent():
    reg = registry()
    reg.on_service("scheduler", "s-1", draining=False, now=100.0)
    reg.on_service("fusion", "f-1", draining=False, now=100.0)
    reg.on_service("fusion", "f-2", draining=True, now=102.0)
    reg.on_service("scheduler", "s-2", draining=False, now=103.0)  # a second instance at once
    assert reg.service_instances(now=104.0) == [("fusion", "f-1", False, 4.0), ("fusion", "f-2", True, 2.0),
                                                 ("scheduler", "s-1", False, 4.0), ("scheduler", "s-2", False, 1.0)]
    reg.sweep(now=105.5)  # timeout 5 s: f-1 and s-1 went silent
    assert [(s, i) for s, i, _, _ in reg.service_instances(now=105.5)] == [("fusion", "f-2"), ("scheduler", "s-2")]


def test_status_lists_workers_world_services_and_the_schedulers_queue():
    reg = registry(beat("w1"), beat("w2"), now=100.0)
    reg.on_service("kvstore", "kv-1", draining=False, now=99.0)
    queue = [QueuedRequest(request_id="r9", place=1, prefill_tokens=500, waited_s=1.5)]
    status = reg.status(queued_requests=2, queue=queue, active_requests=3, now=101.0)
    assert status.model == "demo" and [w.worker_id for w in status.workers] == ["w1", "w2"]
    assert all(w.last_seen_s == 1.0 for w in status.workers)
    assert (status.queued_requests, status.queue, status.active_requests) == (2, queue, 3)
    assert [(s.service, s.instance, s.last_seen_s) for s in status.services] == [("kvstore", "kv-1", 2.0)]
    assert status.world_generation == reg.generation and status.world_ready == reg.world_ready
