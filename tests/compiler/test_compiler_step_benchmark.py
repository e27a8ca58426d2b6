"""benchmarks/compiler_step.py --user-models: one row per model × strategy × batch, verified against PyTorch
before it is timed (no timing assertions here: figures go to benchmarks/results)."""
from __future__ import annotations

import json

from benchmarks.compiler_step import run_user_case

ROW_FIELDS = {"model", "strategy", "batch", "executor_ms", "torch_ms", "ratio", "steps_timed", "trainable_params",
              "tuning", "arena_bytes", "arena_lower_bound_bytes", "arena_over_lower_bound", "torch_baseline",
              "verified"}


def test_user_model_row_is_verified_and_complete():
    row = run_user_case("residual_mlp", "lora+head", 1, repeats=3, budget_s=0.5)
    assert "error" not in row, row.get("error")
    assert ROW_FIELDS <= set(row)
    assert "losses and parameters equal" in row["verified"]
    assert row["tuning"]["train"] == ["head"] and row["tuning"]["targets"] == ["inp", "mix"]
    # LoRA factors of inp (8→16) and mix (8→8) at rank 2, plus head's 16·4 weight and 4 biases
    assert row["trainable_params"] == 2 * (8 + 16) + 2 * (8 + 8) + 16 * 4 + 4
    assert row["steps_timed"] >= 1 and row["executor_ms"] > 0 and row["torch_ms"] > 0
    assert row["arena_over_lower_bound"] >= 1.0
    json.dumps(row)  # the row goes into the results JSON as it is


def test_strategy_without_meaning_is_a_row_with_its_reason():
    row = run_user_case("autoencoder", "lora+head", 1, repeats=3, budget_s=0.5)
    assert row == {"model": "autoencoder", "strategy": "lora+head", "batch": 1,
                   "error": "not meaningful: the model has no head"}
