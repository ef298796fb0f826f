"""Payload capture: a sample of requests and their answers, written as
CloudEvents JSON lines by a background writer (PAYLOAD_LOG_DIR, PAYLOAD_SAMPLE).

`events.py` builds the lines, `files.py` rotates and prunes the files,
`writer.py` buffers and writes them off the request path; `hook.py` is what
the prediction routes call once their answer is computed.
"""
