"""Every adapter runtime the server has. The engine builds its kind -> runtime / loader tables from this list
(each runtime's `kinds`), so a new adapter family is one runtime file and one line here.

`UnionRuntime` serves union adapters (AdapterHub ConfigUnion: MAM, UniPELT) through the runtimes that can load a
union part (`load_part`, adapters/interface.py): it comes last and is given the others."""
from __future__ import annotations

from adapters.adapterhub_lora_runtime import AdapterHubLoraRuntime
from adapters.adapterhub_prefix import AdapterHubPrefixRuntime
from adapters.bitfit_runtime import BitFitRuntime
from adapters.bottleneck_runtime import BottleneckRuntime
from adapters.fusion_runtime import FusionRuntime
from adapters.gated_bottleneck import GatedBottleneckRuntime
from adapters.gated_prefix import GatedPrefixRuntime
from adapters.ia3_runtime import IA3Runtime
from adapters.interface import AdapterRuntime, AdaptableModel
from adapters.lora_runtime import LoraRuntime
from adapters.prefix_runtime import PrefixRuntime
from adapters.union import UnionRuntime


def make_runtimes(model: AdaptableModel) -> list[AdapterRuntime]:
    """One instance of each runtime on `model`, in the order their hooks run."""
    runtimes = [LoraRuntime(model), PrefixRuntime(model), AdapterHubPrefixRuntime(model), IA3Runtime(model),
                BitFitRuntime(model), BottleneckRuntime(model), FusionRuntime(model),
                AdapterHubLoraRuntime(model), GatedBottleneckRuntime(model), GatedPrefixRuntime(model)]
    return [*runtimes, UnionRuntime(runtimes)]
