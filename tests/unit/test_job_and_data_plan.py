"""Job YAML validation (fails up front, naming the field) and the deterministic data order."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
import yaml

from mocha.config import ConfigError
from mocha.train.data import RankData, ShardRef, StreamPlan
from mocha.train.job import load_job
from mocha.train.prefetch import StepPrefetcher

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["stage1.yaml", "stage2.yaml"])
def test_real_size_job_files_validate_and_are_executable(name):
    path = ROOT / "jobs" / name
    job = load_job(path)
    assert job.scaling.use_gpu and job.deepspeed.zero_stage == 2
    assert [e.kind for e in job.model.encoders] == ["siglip", "convnext", "clip", "dinov2"]
    assert path.stat().st_mode & stat.S_IXUSR
    first = path.read_text().splitlines()[0]
    assert first.startswith("#!") and "mocha train" in first  # a YAML comment that runs the file


def _write(tmp_path, data) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _base() -> dict:
    return yaml.safe_load((ROOT / "jobs" / "stage2.yaml").read_text())


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d["schedule"].update(learning_rate=1), "schedule.learning_rate"),
    (lambda d: d["scaling"].update(num_workers="many"), "scaling.num_workers"),
    (lambda d: d["deepspeed"].update(ep_size=3), "ep_size (3) must divide"),
    (lambda d: d.pop("data"), "data"),
    (lambda d: d["deepspeed"].update(zero_stage=3, ep_size=4), "DeepSpeed rejects MoE with ZeRO stage 3"),
    (lambda d: d["model"].update(template="plain"), "stage 2 instruction-tunes"),
    (lambda d: d["schedule"].update(global_batch_size=100), "global_batch_size (100)"),
    (lambda d: d["data"].update(prefetch_batches=-1), "data.prefetch_batches"),
    (lambda d: (d["model"].update(llm_experts={"layers": [0], "num_experts": 6}), d["deepspeed"].update(ep_size=4)),
     "must divide num_experts (6) of model.llm_experts"),
    (lambda d: d.update(moe_llm={"enabled": True}), "moe_llm"),
    (lambda d: d["schedule"].update(lr=float("inf")), "schedule.lr: Input should be a finite number"),
    (lambda d: d["schedule"].update(grad_clip=float("nan")), "schedule.grad_clip: Input should be a finite number"),
    (lambda d: d["schedule"].update(epochs=float("inf")), "schedule.epochs"),
])
def test_invalid_job_fails_naming_the_field(tmp_path, mutate, field):
    data = _base()
    mutate(data)
    with pytest.raises(ConfigError) as err:
        load_job(_write(tmp_path, data))
    assert field in str(err.value)


def test_llm_experts_are_one_config_in_the_model_section(tmp_path):
    dense = load_job(_write(tmp_path, _base()))
    assert dense.model.llm_experts is None and dense.expert_counts == {"model.connector": 4}
    data = _base()
    data["model"]["llm_experts"] = {"layers": [1], "num_experts": 4, "top_k": 2, "balance_coef": 0.02}
    job = load_job(_write(tmp_path, data))
    experts = job.model.llm_experts
    assert (experts.layers, experts.num_experts, experts.top_k, experts.balance_coef, experts.z_coef) == \
        ([1], 4, 2, 0.02, 0.001)
    assert job.expert_counts == {"model.connector": 4, "model.llm_experts": 4}


def test_zero3_with_moe_runs_when_experts_are_replicated(tmp_path):
    data = _base()
    data["deepspeed"].update(zero_stage=3, ep_size=1)
    assert load_job(_write(tmp_path, data)).deepspeed.zero_stage == 3


def test_overrides_apply_by_dotted_path(tmp_path):
    job = load_job(ROOT / "jobs" / "stage2.yaml", ["scaling.num_workers=8", "schedule.lr=1e-4"])
    assert job.scaling.num_workers == 8 and job.schedule.lr == 1e-4
    with pytest.raises(ConfigError, match="scaling.num_workers"):
        load_job(ROOT / "jobs" / "stage2.yaml", ["scaling.num_workers=0"])


def test_relative_paths_resolve_against_working_dir(tmp_path, monkeypatch):
    data = _base()
    data["data"] = {"shards": "./data/shards"}
    monkeypatch.chdir(tmp_path)
    job = load_job(_write(tmp_path, data))
    assert job.data.shards == os.path.join(str(tmp_path.resolve()), "data/shards")


# ---------------------------------------------------------------- data order

def _shards(counts):
    return [ShardRef(f"shard-{i:06d}.tar", f"/x/shard-{i:06d}.tar", n) for i, n in enumerate(counts)]


def test_stream_plan_locates_positions_across_shards_and_epochs():
    plan = StreamPlan(_shards([5, 3, 4, 2]), num_streams=2, seed=0, shuffle=False)
    assert [s.name for s in plan.epoch_streams(0)[0]] == ["shard-000000.tar", "shard-000002.tar"]
    assert plan.stream_samples(0, 0) == 9 and plan.stream_samples(1, 0) == 5
    pos = plan.locate(0, 6)  # 5 in shard 0, then 1 into shard 2
    assert (pos.epoch, pos.shard_index, pos.offset) == (0, 1, 1)
    pos = plan.locate(1, 5 + 4)  # wraps into epoch 1, second shard of that epoch's stream
    assert (pos.epoch, pos.shard_index, pos.offset) == (1, 1, 1)


def test_shuffle_is_seeded_and_differs_per_epoch():
    a = StreamPlan(_shards([1] * 12), 3, seed=5)
    b = StreamPlan(_shards([1] * 12), 3, seed=5)
    assert a.epoch_streams(0) == b.epoch_streams(0)
    assert a.epoch_streams(0) != a.epoch_streams(1)
    assert sorted(s.name for st in a.epoch_streams(1) for s in st) == sorted(s.name for s in a.shards)




def _rank_data(monkeypatch, world, rank, start_step=0):
    """RankData over four small shards in two streams; rows are "<shard>:<index>" keys (the Ray
    Data read is replaced by a generator of the same rows, in shard order)."""
    import mocha.train.data as data

    plan = StreamPlan(_shards([3, 5, 4, 6]), num_streams=2, seed=1)
    by_url = {s.url: s for s in plan.shards}

    def fake_read_rows(paths, filesystem):
        for p in paths:
            for i in range(by_url[p].num_samples):
                yield {"__key__": f"{by_url[p].name}:{i}"}

    monkeypatch.setattr(data, "read_rows", fake_read_rows)
    return RankData(plan, rank, world, global_batch=4, micro_batch=4 // world if world == 2 else 2,
                    start_step=start_step, filesystem_for=lambda u: (None, u), decode=lambda row: row["__key__"])


def _global_batches(world, steps, start_step=0, monkeypatch=None):
    ranks = [_rank_data(monkeypatch, world, r, start_step) for r in range(world)]
    out = []
    for _ in range(steps):
        micro = []
        for rd in ranks:
            micro.extend(mb for mb in rd.next_step().micro_batches if mb)
        out.append(micro)
    return out


def test_global_batches_are_identical_on_1_and_2_workers_and_resume_exactly(monkeypatch):
    two = _global_batches(2, 10, monkeypatch=monkeypatch)
    one = _global_batches(1, 10, monkeypatch=monkeypatch)
    assert two == one  # same samples, same micro-batches, same order
    seen = [k for step in two[:4] for mb in step for k in mb]
    assert len(seen) == len(set(seen)) == 16  # nothing repeated inside the first epoch slice
    resumed = _global_batches(2, 4, start_step=6, monkeypatch=monkeypatch)
    assert resumed == two[6:10]


# ---------------------------------------------------------------- prefetching

def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("mocha-prefetch")]


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetched_steps_equal_inline_steps_and_are_made_off_the_loop_thread(monkeypatch, depth):
    inline = _rank_data(monkeypatch, 2, 1)
    expected = [inline.next_step() for _ in range(9)]
    assert all(len(step.micro_batches) == 1 and set(step.keys) == {1} for step in expected)  # crosses shard and epoch boundaries
    ahead = _rank_data(monkeypatch, 2, 1)
    threads = []

    def make_step():
        threads.append(threading.current_thread())
        return ahead.next_step()

    with StepPrefetcher(make_step, depth=depth, total=9) as prefetched:
        assert list(prefetched) == expected
    assert threads and all(t is not threading.main_thread() for t in threads)
    assert _prefetch_threads() == []  # stopped at the end


def test_prefetch_depth_zero_reads_inline():
    calls = []
    with StepPrefetcher(lambda: calls.append(threading.current_thread()) or len(calls), depth=0, total=3) as p:
        assert list(p) == [1, 2, 3]
    assert calls == [threading.main_thread()] * 3


def test_prefetcher_counts_only_consumed_steps_and_a_resume_there_continues_the_order(monkeypatch):
    ahead = _rank_data(monkeypatch, 1, 0)
    calls = []

    def make_step():
        calls.append(len(calls))
        return ahead.next_step()

    with StepPrefetcher(make_step, depth=2, total=10) as prefetched:
        taken = [prefetched.next() for _ in range(4)]
        assert prefetched.consumed == 4
        assert len(calls) <= 4 + 2  # at most `depth` steps prepared ahead, none counted as consumed
        rest = list(prefetched)
    assert len(calls) == 10  # never reads past the run's last step
    resumed = _rank_data(monkeypatch, 1, 0, start_step=4)  # a checkpoint after 4 steps
    assert [resumed.next_step() for _ in range(6)] == rest
    assert [step.micro_batches for step in taken + rest] == _global_batches(1, 10, monkeypatch=monkeypatch)


def test_a_failing_step_raises_its_own_error_in_the_loop_and_stops_the_thread():
    def make_step():
        make_step.calls += 1
        if make_step.calls == 3:
            raise ValueError("sample 'k3': feature shard has no features for encoders ['clip']")
        return make_step.calls

    make_step.calls = 0
    prefetched = StepPrefetcher(make_step, depth=2, total=8)
    assert [prefetched.next(), prefetched.next()] == [1, 2]
    with pytest.raises(ValueError, match=r"sample 'k3': feature shard has no features"):
        prefetched.next()
    assert _prefetch_threads() == []
    assert make_step.calls == 3  # nothing read after the failure
    with pytest.raises(RuntimeError, match="closed"):
        prefetched.next()


def test_closing_mid_run_waits_for_the_step_in_progress_and_drops_the_rest():
    in_second_step, release = threading.Event(), threading.Event()
    started = []

    def make_step():
        started.append(len(started) + 1)
        if len(started) == 2:
            in_second_step.set()
            release.wait()
        return started[-1]

    prefetched = StepPrefetcher(make_step, depth=2, total=100)
    assert prefetched.next() == 1
    in_second_step.wait()  # step 2 is being prepared, step 3 is queued behind it
    closer = threading.Thread(target=prefetched.close)
    closer.start()
    release.set()
    closer.join()
    assert _prefetch_threads() == []
    assert started == [1, 2]  # the queued step was cancelled, not run
