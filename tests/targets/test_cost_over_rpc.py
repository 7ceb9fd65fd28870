"""The scheduler's cost function measures on a device farm: every candidate's latency
comes from a TVM module timed on a board behind the RPC tracker."""

from __future__ import annotations

from tailor.costing import cost_function, model_cost
from tailor.ir import Model


def test_cost_function_measures_candidates_over_rpc(rpc_farm, pruned_digits):
    costs = cost_function("host", rpc=str(rpc_farm.address), key=rpc_farm.key)
    figures = costs(Model.load(pruned_digits))
    assert figures["latency"] > 0 and costs.sources["latency"] == "measured"
    assert costs.sources["energy"] == "power-model"


def test_tailor_cost_over_rpc(rpc_farm, pruned_digits):
    cost = model_cost(
        str(pruned_digits), "host", rpc=str(rpc_farm.address), key=rpc_farm.key, runs=3
    )
    latency = cost.total["latency_ms"]
    assert latency.source == "measured" and "tvm" in latency.note.lower()
