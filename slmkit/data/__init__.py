"""Corpora, splits and token caches: see :mod:`slmkit.data.corpus`, :mod:`.split`, :mod:`.tokens`."""
