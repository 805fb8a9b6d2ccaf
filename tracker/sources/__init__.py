"""Implementation of :mod:`tracker.ingest`, one concept per module.

``spec`` (source strings, options and their ranges, redaction: no I/O),
``policy`` (the server's allowlist and option caps, for client-named sources),
``policed_io`` (PyAV's ``io_open`` for those sources: every URL FFmpeg opens,
nested ones and redirects included, checked against the policy), ``frame``
(the Frame type and RGB/rotate/resize/preprocess), ``delivery`` (newest-frame
and bounded-queue hand-off, stats, events), ``av_reader`` (PyAV options,
error mapping, packet-by-packet decoding), ``base`` (the consumer API),
``av_source`` / ``images`` / ``push`` (the three kinds of producer).

Import from :mod:`tracker.ingest`; these module paths may change.
"""
