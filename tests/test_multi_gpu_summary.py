"""benchmarks/multi_gpu.py's reading of a run's metrics.jsonl: steady-state epoch time and its time split."""

import json
import math
from types import SimpleNamespace

from benchmarks.multi_gpu import summarise, table


def test_summary_leaves_out_the_first_epoch_and_averages_the_split(tmp_path):
    rows = [{"step": 0, "wall_time": 10.0, "eval/overall": 0.3}]
    for epoch, (end, rollout, update) in enumerate([(14.0, 2.0, 1.5), (16.0, 1.0, 0.8), (18.5, 1.2, 1.1)], start=1):
        rows.append({"step": epoch, "wall_time": end, "loss/total": 0.1 * epoch, "policy/grad_norm": 1.0,
                     "reward/mean": 0.5, "time/rollout": rollout, "time/update": update, "time/eval": 9.0})
    rows.append({"step": 3, "wall_time": 20.0, "eval/overall": 0.4})
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    args = SimpleNamespace(cpu=False, prompts=4, group=2)
    out = summarise(path, args)
    assert out["epoch_durations_s"] == [4.0, 2.0, 2.5]
    assert math.isclose(out["epoch_s"], 2.25) and math.isclose(out["samples_per_s"], 8 / 2.25)
    split = out["time_split_s"]  # epochs 2-3; the evaluation left out
    assert split.keys() == {"rollout", "update"}
    assert math.isclose(split["rollout"], 1.1) and math.isclose(split["update"], 0.95)
    assert out["final_eval"] == {"eval/overall": 0.4}
    results = {"ddp": {"1gpu": {**out, "rc": 0, "gpus": 1}, "2gpu": {**out, "rc": 0, "gpus": 2},
                       "compare": {"speedup": 1.0, "max_abs_dloss": 0.0, "max_rel_dloss": 0.0, "eval_1gpu": 0.4,
                                   "eval_2gpu": 0.4}}}
    text = table(results, SimpleNamespace(cpu=False, prompts=4, group=2, rollout_batch=8, train_batch=4, epochs=3,
                                          mixed_precision="no"), "test")
    assert "| ddp | 2 | 1.100 | 0.950 |" in text
