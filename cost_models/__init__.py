"""Cost models: storage, MACs/params, latency, energy, accuracy (see DESIGN.md)."""

from tailor.cost_models.base import SOURCES, Estimate, LayerCost, ModelCost
from tailor.cost_models.energy import (
    layer_energy,
    measure_energy,
    measure_energy_ina,
    model_energy,
    power_model_energy,
)
from tailor.cost_models.macs import layer_macs, model_macs, weighted_layers
from tailor.cost_models.memory import peak_memory
from tailor.cost_models.storage import constant_bytes, layer_storage, model_storage

__all__ = [
    "SOURCES",
    "Estimate",
    "LayerCost",
    "ModelCost",
    "constant_bytes",
    "layer_energy",
    "layer_macs",
    "layer_storage",
    "measure_energy",
    "measure_energy_ina",
    "model_energy",
    "model_macs",
    "model_storage",
    "peak_memory",
    "power_model_energy",
    "weighted_layers",
]
