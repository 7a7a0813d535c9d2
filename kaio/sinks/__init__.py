"""Where a run's record goes besides its report: Comet ML (``kaio.sinks.comet``) and the
Hugging Face Hub (``kaio.sinks.hub``).

Import the submodule you need. Neither imports its vendor library (comet_ml,
huggingface_hub) until it is used, and this package imports nothing.
"""
