"""Every adapter runtime the server has. The engine builds its kind -> runtime / loader tables from this list
(each runtime's `kinds`), so a new adapter family is one runtime file and one line here."""
from __future__ import annotations

from adapters.bitfit_runtime import BitFitRuntime
from adapters.bottleneck_runtime import BottleneckRuntime
from adapters.fusion_runtime import FusionRuntime
from adapters.ia3_runtime import IA3Runtime
from adapters.interface import AdapterRuntime, AdaptableModel
from adapters.lora_runtime import LoraRuntime
from adapters.prefix_runtime import PrefixRuntime


def make_runtimes(model: AdaptableModel) -> list[AdapterRuntime]:
    """One instance of each runtime on `model`, in the order their hooks run."""
    return [LoraRuntime(model), PrefixRuntime(model), IA3Runtime(model), BitFitRuntime(model),
            BottleneckRuntime(model), FusionRuntime(model)]
