"""sam2-stream's engine: ingest, SAM 2 model loading, the streaming predictor,
sessions, mask codecs and exports. No network server code lives here (see ``server``)."""

__version__ = "0.1.0"
