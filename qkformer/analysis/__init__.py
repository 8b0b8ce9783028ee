"""Analysis tools: firing rates, energy (SOPs), attention cost vs N, QKTA attention maps, time-step
sweeps and learning curves against the reference logs. Each module is also a CLI
(``python -m qkformer.analysis.<tool> --help``).

The functions below are imported lazily (PEP 562), so that ``python -m qkformer.analysis.<tool>``
does not import the tool's module twice (once through this package, once as ``__main__``).
"""
import importlib

_EXPORTS = {
    "firing_rates": "firing", "FiringRateMeter": "firing", "save_firing_rates": "firing",
    "measure_energy": "energy", "EnergyMeter": "energy", "EnergyReport": "energy",
    "E_MAC_PJ": "energy", "E_AC_PJ": "energy", "save_energy": "energy",
    "measure_attention_cost": "attention_cost", "fit_slopes": "attention_cost",
    "token_attention_maps": "attention_maps", "render_attention_maps": "attention_maps",
    "evaluate_timesteps": "timesteps",
    "load_reference": "curves", "read_log": "curves", "compare_to_reference": "curves",
    "plot_curves": "curves",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
