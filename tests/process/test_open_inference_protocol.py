"""Real V2 clients (tritonclient, and KServe's InferenceRESTClient), with and
without request compression, and the protocol's OpenAPI document
(schemathesis) against a real Gunicorn server.

The document is the V2 dataplane one MLServer ships in its wheel, which
`make oip-spec` takes out of the pinned, digest-checked wheel into .tools/
(OIP_SPEC names it). Without it these tests fail: they never skip.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from tritonclient.utils import InferenceServerException

from service.routes.table import FAST_ROUTES
from tests.support.bundles import REPO, pinned_digests
from tests.support.servers import Gunicorn, running_gunicorn
from tests.support.user_models import MIXED_NAME, package_mixed_regressor
from tests.support.v2 import FEATURES, ROWS, binary_request, read_response

pytestmark = pytest.mark.process

SPEC = Path(
    os.environ.get("OIP_SPEC", REPO / ".tools" / "open-inference-protocol" / "dataplane.json")
)
# MLServer's document goes beyond the protocol's REST API with streaming and
# text generation, which ml-api does not offer (these paths answer 404).
NOT_SERVED = ("/infer_stream", "/generate", "/generate_stream")
# MLServer types a tensor's data `oneOf: [array, "bytes"]`, and "bytes" is no
# JSON Schema type; the protocol's own definition stands in for it: nested
# arrays of numbers, strings or booleans.
MLSERVER_TENSOR_DATA = [{"type": "array"}, {"type": "bytes"}]
TENSOR_DATA = {
    "title": "TensorData",
    "type": "array",
    "items": {
        "anyOf": [
            {"$ref": "#/components/schemas/TensorData"},
            {"type": "number"},
            {"type": "string"},
            {"type": "boolean"},
        ]
    },
}
CLASSES = ["setosa", "versicolor", "virginica"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, trained_bundle: Path) -> Iterator[Gunicorn]:
    model_dir = trained_bundle.parents[1]  # read-only use: no copy needed
    with running_gunicorn(model_dir, tmp_path_factory.mktemp("v2-server")) as gunicorn:
        yield gunicorn


@pytest.fixture
def client(server: Gunicorn) -> Iterator[triton.InferenceServerClient]:
    triton_client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield triton_client
    triton_client.close()


class CompressingClient:
    """tritonclient with request compression on every infer call, as Triton accepts it."""

    def __init__(self, client: triton.InferenceServerClient, algorithm: str | None) -> None:
        self._client = client
        self._algorithm = algorithm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def infer(self, *args: Any, **kwargs: Any) -> Any:
        return self._client.infer(*args, request_compression_algorithm=self._algorithm, **kwargs)


@pytest.fixture(params=[None, "gzip", "deflate"])
def infer_client(
    request: pytest.FixtureRequest, client: triton.InferenceServerClient
) -> CompressingClient:
    return CompressingClient(client, request.param)


def _inputs(rows: np.ndarray, binary: bool) -> list[triton.InferInput]:
    tensor = triton.InferInput("features", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    return [tensor]


def test_server_and_model_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("iris")
    assert client.is_model_ready("iris", "1.0.0")
    assert not client.is_model_ready("iris", "9.9.9")
    assert not client.is_model_ready("wine")
    server = client.get_server_metadata()
    assert server["name"] == "ml-api"
    assert "binary_tensor_data" in server["extensions"]
    for version in ("", "1.0.0"):
        metadata = client.get_model_metadata("iris", version)
        assert metadata["versions"] == ["1.0.0"]
        assert metadata["inputs"] == [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": [-1, 4],
                "parameters": {"feature_names": FEATURES, "nullable": [False] * 4},
            }
        ]
        assert [o["name"] for o in metadata["outputs"]] == [
            "predicted_class",
            "predicted_class_name",
            "probabilities",
        ]


@pytest.mark.parametrize("binary_inputs", [False, True])
@pytest.mark.parametrize("binary_outputs", [False, True])
def test_inference_equals_predict_for_the_same_rows(
    infer_client: CompressingClient,
    server: Gunicorn,
    binary_inputs: bool,
    binary_outputs: bool,
) -> None:
    rows = np.vstack([ROWS, np.array([[6.0, 2.9, 4.5, 1.5]], dtype=np.float32)])
    outputs = [
        triton.InferRequestedOutput(name, binary_data=binary_outputs)
        for name in ("predicted_class", "predicted_class_name", "probabilities")
    ]
    result = infer_client.infer(
        "iris", _inputs(rows, binary_inputs), outputs=outputs, request_id="triton-1"
    )
    assert result.get_response()["id"] == "triton-1"
    assert result.get_response()["model_version"] == "1.0.0"
    instances = [dict(zip(FEATURES, row, strict=True)) for row in rows.tolist()]
    expected = httpx.post(f"{server.url}/predict/batch", json={"instances": instances}).json()
    predictions = expected["predictions"]
    assert result.as_numpy("predicted_class").tolist() == [
        p["predicted_class"] for p in predictions
    ]
    names = [
        n.decode() if isinstance(n, bytes) else n for n in result.as_numpy("predicted_class_name")
    ]
    assert names == [p["predicted_class_name"] for p in predictions]
    np.testing.assert_allclose(
        result.as_numpy("probabilities"),
        [[p["probabilities"][c] for c in CLASSES] for p in predictions],
        atol=1e-6,
    )


def test_default_request_gets_every_output_in_binary(infer_client: CompressingClient) -> None:
    # Without `outputs`, tritonclient asks for binary_data_output.
    result = infer_client.infer("iris", _inputs(ROWS, True), model_version="1.0.0")
    assert result.as_numpy("probabilities").shape == (2, 3)
    assert result.as_numpy("predicted_class").tolist() == [0, 2]
    assert [n.decode() for n in result.as_numpy("predicted_class_name")] == ["setosa", "virginica"]


@pytest.mark.parametrize(
    ("call", "status", "fragment"),
    [
        (lambda c: c.get_model_metadata("wine"), "404", "unknown model 'wine'"),
        (lambda c: c.get_model_metadata("iris", "2.0.0"), "404", "unknown version '2.0.0'"),
        (lambda c: c.infer("wine", _inputs(ROWS, True)), "404", "unknown model"),
        (lambda c: c.infer("iris", _inputs(ROWS, True), "0.9.0"), "404", "unknown version"),
        (lambda c: c.infer("iris", _wrong_datatype()), "400", "datatype 'FP16'"),
        (lambda c: c.infer("iris", _inputs(ROWS[:, :3].copy(), True)), "400", "3 columns"),
        (lambda c: c.infer("iris", _inputs(_with_nan(), True)), "400", "row 1 feature"),
        (
            lambda c: c.infer("iris", _inputs(ROWS, False), outputs=[_output("label")]),
            "400",
            "unknown output 'label'",
        ),
    ],
)
def test_errors_reach_the_client_with_status_and_message(
    infer_client: CompressingClient, call: Any, status: str, fragment: str
) -> None:
    with pytest.raises(InferenceServerException) as raised:
        call(infer_client)
    assert raised.value.status() == status
    assert fragment in raised.value.message()


def _wrong_datatype() -> list[triton.InferInput]:
    tensor = triton.InferInput("features", [2, 4], "FP16")
    tensor.set_data_from_numpy(ROWS.astype(np.float16), binary_data=True)
    return [tensor]


def _with_nan() -> np.ndarray:
    rows = ROWS.copy()
    rows[1, 0] = np.nan
    return rows


def _output(name: str) -> triton.InferRequestedOutput:
    return triton.InferRequestedOutput(name, binary_data=False)


@pytest.mark.parametrize(
    ("mangle", "fragment"),
    [
        (lambda body, length: (body[:-3], length), "binary_data_size"),
        (lambda body, length: (body, str(len(body) + 10)), "Inference-Header-Content-Length"),
    ],
)
def test_broken_binary_framing_is_400_over_http(
    server: Gunicorn, mangle: Any, fragment: str
) -> None:
    body, headers = binary_request(_with_nan()[:1])
    body, length = mangle(body, headers["inference-header-content-length"])
    response = httpx.post(
        f"{server.url}/v2/models/iris/infer",
        content=body,
        headers={"inference-header-content-length": length},
    )
    assert response.status_code == 400
    assert fragment in response.json()["error"]


def test_binary_response_over_http_reads_back(server: Gunicorn) -> None:
    body, headers = binary_request(ROWS, parameters={"binary_data_output": True})
    response = httpx.post(f"{server.url}/v2/models/iris/infer", content=body, headers=headers)
    outputs = read_response(response.content, response.headers["inference-header-content-length"])
    assert outputs["outputs"]["predicted_class_name"] == ["setosa", "virginica"]


def _reference_document() -> dict[str, Any]:
    if not SPEC.is_file():
        pytest.fail(
            f"no Open Inference Protocol document at {SPEC}: `make oip-spec` fetches it",
            pytrace=False,
        )
    document: dict[str, Any] = json.loads(SPEC.read_text())
    schemas = document["components"]["schemas"]
    assert schemas["TensorData"]["oneOf"] == MLSERVER_TENSOR_DATA, "TensorData changed upstream"
    schemas["TensorData"] = TENSOR_DATA
    return document


def _served_paths(document: dict[str, Any]) -> dict[str, Any]:
    return {path: item for path, item in document["paths"].items() if not path.endswith(NOT_SERVED)}


def _specification(model: str, version: str | None) -> dict[str, Any]:
    """The reference document's served paths with the model name (and version) filled in."""
    document = _reference_document()
    paths: dict[str, Any] = {}
    for path, item in _served_paths(document).items():
        item = copy.deepcopy(item)
        path = path.replace("{model_name}", model)
        if version:
            path = path.replace("{model_version}", version)
        item["parameters"] = [
            p
            for p in item.get("parameters", [])
            if p["name"] != "model_name" and (version is None) == (p["name"] == "model_version")
        ] or None
        if item["parameters"] is None:
            del item["parameters"]
        paths[path] = item
    document["paths"] = paths
    return document


def test_every_route_of_the_protocol_document_is_served() -> None:
    documented = {
        (method.upper(), path)
        for path, item in _served_paths(_reference_document()).items()
        for method in item
        if method != "parameters"
    }
    served = {(route.method, route.path) for route in FAST_ROUTES if route.path.startswith("/v2")}
    assert documented == served
    assert len(documented) == 9


served_schema = schemathesis.openapi.from_dict(_specification("iris", "1.0.0"))
any_version_schema = schemathesis.openapi.from_dict(_specification("iris", None))
for _schema in (served_schema, any_version_schema):
    # Requests that do not fit the document too (negative_data_rejection: 4xx).
    _schema.config.generation.update(modes=list(GenerationMode))
SCHEMA_RUN = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


@served_schema.parametrize()
@SCHEMA_RUN
def test_every_response_matches_the_specification(case: Any, server: Gunicorn) -> None:
    # Every check but one: the document's request schema admits any tensors,
    # and the specification itself answers those the model cannot take with
    # the documented 400 {"error"} (which the remaining checks verify).
    case.call_and_validate(base_url=server.url, excluded_checks=[positive_data_acceptance])


@any_version_schema.parametrize()
@SCHEMA_RUN
def test_no_version_name_causes_a_server_error(case: Any, server: Gunicorn) -> None:
    response = case.call(base_url=server.url)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()) == {"error"}


# Every route the served document holds: the fast path's and FastAPI's.
DOCUMENTED = [(route.method, route.path) for route in FAST_ROUTES] + [
    ("GET", path)
    for path in ("/health", "/health/live", "/health/ready", "/model-info", "/metrics")
]


@pytest.mark.parametrize(("method", "path"), DOCUMENTED, ids=lambda value: str(value))
def test_every_route_answers_as_the_served_document_says(
    server: Gunicorn, method: str, path: str
) -> None:
    document = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    document.config.generation.update(modes=list(GenerationMode))
    operations = [result.ok() for result in document.get_all_operations()]  # type: ignore[union-attr]
    (operation,) = [op for op in operations if op.path == path and op.method.upper() == method]

    @given(case=operation.as_strategy())
    @SCHEMA_RUN
    def conforms(case: Any) -> None:
        case.call_and_validate(base_url=server.url, excluded_checks=[positive_data_acceptance])

    conforms()


KSERVE_PYTHON = Path(os.environ.get("KSERVE_PYTHON", REPO / ".tools" / "kserve" / "bin" / "python"))


@pytest.fixture(scope="module")
def kserve_results(server: Gunicorn) -> dict[str, Any]:
    """KServe's InferenceRESTClient, in the SDK's own virtualenv (made if missing)."""
    if "KSERVE_PYTHON" not in os.environ:
        subprocess.run(["make", "--no-print-directory", "kserve-sdk"], cwd=REPO, check=True)
    ran = subprocess.run(
        [
            str(KSERVE_PYTHON),
            str(REPO / "tests" / "support" / "kserve_client.py"),
            server.url,
            json.dumps(ROWS.tolist()),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    results: dict[str, Any] = json.loads(ran.stdout)
    return results


def test_kserve_client_health(kserve_results: dict[str, Any]) -> None:
    assert kserve_results["live"] is True
    assert kserve_results["ready"] is True
    assert kserve_results["model_ready"] is True
    assert kserve_results["unknown_model_ready"] is False


@pytest.mark.parametrize("coding", ["plain", "gzip", "deflate"])
@pytest.mark.parametrize("form", ["json", "binary"])
def test_kserve_client_inference_equals_predict(
    kserve_results: dict[str, Any], server: Gunicorn, coding: str, form: str
) -> None:
    instances = [dict(zip(FEATURES, row, strict=True)) for row in ROWS.tolist()]
    expected = httpx.post(f"{server.url}/predict/batch", json={"instances": instances}).json()
    predictions = expected["predictions"]
    result = kserve_results[f"{coding}-{form}"]
    assert result["id"] == "kserve-1"
    outputs = result["outputs"]
    assert outputs["predicted_class"] == [p["predicted_class"] for p in predictions]
    assert outputs["predicted_class_name"] == [p["predicted_class_name"] for p in predictions]
    np.testing.assert_allclose(
        outputs["probabilities"],
        [p["probabilities"][c] for p in predictions for c in CLASSES],
        atol=1e-6,
    )
    if coding != "plain":
        # Every infer call of the run went out compressed.
        assert kserve_results[f"{coding}-requests-compressed"] == 4


@pytest.mark.parametrize("coding", ["plain", "gzip", "deflate"])
def test_kserve_client_errors_carry_status_and_message(
    kserve_results: dict[str, Any], coding: str
) -> None:
    unknown = kserve_results[f"{coding}-unknown-model"]
    assert unknown["status"] == 404
    assert "unknown model 'wine'" in unknown["message"]
    narrow = kserve_results[f"{coding}-three-columns"]
    assert narrow["status"] == 400
    assert "3 columns" in narrow["message"]


def test_tritonclient_sends_category_features_as_bytes_tensors(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Integer, number and category features through a real V2 client, binary and JSON."""
    model_dir = package_mixed_regressor(tmp_path_factory.mktemp("flats"))
    env = {"MODEL_NAME": MIXED_NAME, "TRUSTED_MODEL_SHA256": pinned_digests(model_dir)}
    rows = [
        {"rooms": 3, "area": 80.5, "city": "lyon"},
        {"rooms": 5, "area": 150.0, "city": "paris"},
    ]
    with running_gunicorn(model_dir, tmp_path_factory.mktemp("flats-server"), env=env) as server:
        expected = [
            answer["prediction"]
            for answer in httpx.post(
                f"{server.url}/predict/batch", json={"instances": rows}
            ).json()["predictions"]
        ]
        triton_client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            metadata = triton_client.get_model_metadata(MIXED_NAME)
            assert [(i["name"], i["datatype"]) for i in metadata["inputs"]] == [
                ("features", "FP32"),
                ("city", "BYTES"),
            ]
            for binary in (True, False):
                numbers = triton.InferInput("features", [2, 2], "FP32")
                numbers.set_data_from_numpy(
                    np.array([[r["rooms"], r["area"]] for r in rows], dtype=np.float32),
                    binary_data=binary,
                )
                city = triton.InferInput("city", [2], "BYTES")
                city.set_data_from_numpy(
                    np.array([str(r["city"]).encode() for r in rows], dtype=object),
                    binary_data=binary,
                )
                result = triton_client.infer(MIXED_NAME, [numbers, city])
                predicted = result.as_numpy("prediction")
                assert predicted is not None
                assert predicted.tolist() == pytest.approx(expected, rel=1e-6)
            city.set_data_from_numpy(np.array([b"lyon", b"rome"], dtype=object))
            with pytest.raises(InferenceServerException, match="row 1 feature 'city'"):
                triton_client.infer(MIXED_NAME, [numbers, city])
        finally:
            triton_client.close()
