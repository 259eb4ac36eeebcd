"""Drafters: cheap proposals of the next tokens, verified by the target model."""

from drafters.base import DraftTree, Drafter


def _ngram(**options):
    from drafters.ngram import NgramDrafter

    return NgramDrafter(**options)


# name -> factory; "none" is plain autoregressive decoding (handled by specdec.generate)
REGISTRY = {"ngram": _ngram}


def make_drafter(name, **options) -> Drafter:
    """A drafter by name (see REGISTRY), or a Drafter instance passed through."""
    if isinstance(name, Drafter):
        if options:
            raise TypeError(f"options {sorted(options)} given with a drafter instance")
        return name
    if name not in REGISTRY:
        raise ValueError(f"unknown drafter {name!r}: available: {['none', *sorted(REGISTRY)]}")
    return REGISTRY[name](**options)


__all__ = ["DraftTree", "Drafter", "REGISTRY", "make_drafter"]
