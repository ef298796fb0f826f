"""The bench's per-stage attribution of py-spy samples."""

from __future__ import annotations

from bench.stages import HTTP_LAYER, classify, parse_raw

ROOT = [
    "Runner.run (asyncio/runners.py:118)",
    "RequestResponseCycle.run_asgi (uvicorn/protocols/http/httptools_impl.py:422)",
    "MlApi.__call__ (service/app.py:129)",
    "RequestContextMiddleware.__call__ (service/middleware.py:80)",
    "PredictionFastPath._predict (service/fastpath.py:90)",
]


def test_c_work_counts_toward_the_python_call_that_started_it() -> None:
    route = [*ROOT, "predict (service/routes/predict.py:25)"]
    decode = [*route, "PredictCodec.decode_one (service/predict_codec.py:200)"]
    assert (
        classify(
            [
                *decode,
                "parse_body (service/predict_codec.py:160)",
                "BaseModel.model_validate_json (pydantic/main.py:847)",
            ]
        )
        == "parse + validation"
    )
    assert classify(decode) == "feature matrix"
    run = [*route, "PredictionPipeline.run_row (service/pipeline.py:50)"]
    assert classify([*run, "OnnxBackend.predict_proba (service/backends/onnx.py:30)"]) == (
        "model (backend call)"
    )
    assert classify(run) == "model (backend call)"
    # The route's usual single row: the inline call, or the one-row matrix after it.
    for method in ("run_row_inline", "run_row_matrix"):
        assert classify([*route, f"PredictionPipeline.{method} (service/pipeline.py:50)"]) == (
            "model (backend call)"
        )
    assert classify([*route, "PredictCodec.encode_one (service/predict_codec.py:210)"]) == (
        "response encoding"
    )


def test_the_innermost_recognised_frame_decides() -> None:
    metrics = "HttpMetrics.finish (service/metrics/http.py:40)"
    value = "MultiProcessValue.inc (prometheus_client/values.py:60)"
    assert classify([*ROOT[:4], metrics, value]) == "metrics"


def test_the_open_set_check_counts_as_auth_wherever_it_is_called_from() -> None:
    open_set = "OpenPaths.__contains__ (service/routes/public.py:50)"
    assert classify([*ROOT[:4], open_set]) == "auth"


def test_server_frames_below_our_middleware_are_the_http_layer() -> None:
    send = "RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py:500)"
    with_id = "RequestContextMiddleware.__call__.<locals>.send_with_id (service/middleware.py:90)"
    assert classify([*ROOT, "send_json_bytes (service/middleware.py:140)", with_id, send]) == (
        HTTP_LAYER
    )
    assert classify(ROOT[:2]) == HTTP_LAYER


def test_raw_output_lines_are_summed_per_stage() -> None:
    text = (
        ";".join([*ROOT, "AccessLog.write (service/logs.py:80)"])
        + " 3\n"
        + ";".join(ROOT[:2])
        + " 5\n"
    )
    samples = parse_raw(text)
    assert samples["access log"] == 3
    assert samples[HTTP_LAYER] == 5
