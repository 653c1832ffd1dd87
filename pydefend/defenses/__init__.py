"""Post-training backdoor defenses, one per module, registered by name."""
from .base import REGISTRY, CleanData, DefenseResult, register
from .bna import BNA, BNAConfig
from .tsbd import TSBD, TSBDConfig
from .unibp import UniBP, UniBPConfig
from .unit import UNIT, UNITConfig

__all__ = ["REGISTRY", "BNA", "BNAConfig", "CleanData", "DefenseResult", "register", "TSBD", "TSBDConfig", "UNIT",
           "UNITConfig", "UniBP", "UniBPConfig", "get_defense"]


def get_defense(name: str):
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown defense {name!r}; available: {', '.join(sorted(REGISTRY))}") from None
