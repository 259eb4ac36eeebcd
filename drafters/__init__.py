"""Drafters: cheap proposals of the next tokens, verified by the target model."""

from drafters.base import DraftTree, Drafter


def _lazy(module: str, cls: str):
    def factory(**options):
        import importlib
        import inspect

        drafter_cls = getattr(importlib.import_module(module), cls)
        known = inspect.signature(drafter_cls).parameters
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"{cls} has no option {', '.join(map(repr, unknown))}: its options are {sorted(known)}")
        return drafter_cls(**options)

    return factory


# name -> factory; "none" is plain autoregressive decoding (handled by specdec.generate)
REGISTRY = {
    "ngram": _lazy("drafters.ngram", "NgramDrafter"),
    "sam": _lazy("drafters.suffix_automaton", "SAMDrafter"),
    "suffix": _lazy("drafters.suffix_tree", "SuffixTreeDrafter"),
    "recycle": _lazy("drafters.token_recycling", "TokenRecyclingDrafter"),
    "hybrid": _lazy("drafters.hybrid", "HybridDrafter"),
}


def make_drafter(name, **options) -> Drafter:
    """A drafter by name (see REGISTRY), or a Drafter instance passed through."""
    if isinstance(name, Drafter):
        if options:
            raise TypeError(f"options {sorted(options)} given with a drafter instance")
        return name
    if name == "none":
        raise ValueError("'none' is plain autoregressive decoding, which needs no drafter: pass drafter='none' "
                         "to specdec.generate")
    if name not in REGISTRY:
        raise ValueError(f"unknown drafter {name!r}: available: {['none', *sorted(REGISTRY)]}")
    return REGISTRY[name](**options)


__all__ = ["DraftTree", "Drafter", "REGISTRY", "make_drafter"]
