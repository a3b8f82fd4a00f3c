"""bench.bench_dc_time's arithmetic: time to a target on a curve, the parallel mode's critical path
(clustering + the slowest worker + fine-tuning until the target) and the verdict against K=1 and
K=1 data-parallel at linear speed-up."""

from __future__ import annotations

from bench import bench_dc_time as b


def point(epoch, val, seconds, images=100):
    return {"epoch": epoch, "val_recall@1": val, "images": images if epoch else 0, "seconds": seconds if epoch else 0.0}


def result(worker_seconds, finetune_vals):
    k1 = [point(0, 0.2, 0), point(1, 0.6, 10), point(2, 0.85, 10), point(3, 0.93, 10), point(4, 0.95, 10)]
    workers = [[point(1, None, s, 25), point(2, None, s, 25)] for s in worker_seconds]
    finetune = [point(e, v, 10) for e, v in enumerate(finetune_vals)]
    runs = {"k1": {"config": "k1", "epochs": 4, "train": k1},
            "parallel-w2": {"config": "parallel-w2", "worker_epochs": 2, "cluster_s": 1.5, "workers": workers,
                            "finetune": finetune}}
    r = {"seed": 0, "converged": 1.0, "target": 0.9, "runs": runs, "command": "x", "finetune_epochs": 2}
    r["analysis"] = b.analyse(r)
    r["data_parallel"] = {"machines": 4, "linear_s": r["analysis"]["k1"]["seconds"] / 4}
    return r


def test_k1_reaches_the_target_at_the_first_epoch_over_it():
    r = result([2.0, 3.0, 4.0, 5.0], [0.5, 0.8, 0.95])
    assert r["analysis"]["k1"] == {"epoch": 3, "seconds": 30.0, "images": 300, "val_recall@1": 0.93}


def test_the_parallel_critical_path_is_clustering_plus_slowest_worker_plus_finetuning():
    r = result([2.0, 3.0, 4.0, 5.0], [0.5, 0.8, 0.95])
    row = r["analysis"]["parallel-w2"]
    assert row["slowest_worker_s"] == 10.0 and row["worker_images"] == 50
    assert row["reached"] and row["finetune_epochs"] == 2
    assert row["seconds"] == 1.5 + 10.0 + 20.0 and row["images"] == 50 + 200
    assert row["merged_val_recall@1"] == 0.5 and row["best_val_recall@1"] == 0.95
    # 31.5 s: later than K=1 on one process (30 s) and than K=1 data-parallel on 4 machines (7.5 s).
    verdict = b.verdict(r)
    assert "Data parallelism reaches K=1's quality sooner" in verdict and "still beats one process" not in verdict


def test_a_merged_model_already_at_the_target_needs_no_finetuning_and_can_beat_data_parallelism():
    r = result([1.0, 1.0, 1.0, 1.0], [0.91, 0.92])
    row = r["analysis"]["parallel-w2"]
    assert row["finetune_epochs"] == 0 and row["seconds"] == 1.5 + 2.0
    assert "parallel mode reaches K=1's quality sooner than data parallelism" in b.verdict(r)


def test_a_budget_that_never_reaches_the_target_has_no_time():
    r = result([1.0, 1.0, 1.0, 1.0], [0.5, 0.6])
    row = r["analysis"]["parallel-w2"]
    assert not row["reached"] and row["seconds"] is None and row["images"] is None
    assert row["spent_s"] == 1.5 + 2.0 + 10.0
    assert b.verdict(r).startswith("**No K=4 parallel budget reached the target**")
