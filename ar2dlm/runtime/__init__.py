"""The tri-mode runtime that every export ships: ``modeling_ar2dlm.py`` and ``decoding_ar2dlm.py``, copied as they
are into the exported folder (torch + transformers only, docs/design.md §4). Nothing else lives here: export
installs these files (:mod:`ar2dlm.conversion.runtime_install`) and ar2dlm's own stages load exports with them
(:mod:`ar2dlm.generation.loading`)."""
