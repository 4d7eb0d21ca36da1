"""The OpenAPI description says what the server does: schemathesis generates requests from
/openapi.json (valid and invalid) for the KServe v2 routes, /v1/models and /metrics, and checks that
nothing answers 5xx, that every status and content type is documented, that answers match their
schemas, and that a request the schema rejects is rejected (4xx) by the server too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.bundle import Bundle
from kiln.serve.settings import Settings

from .conftest import FakeBackend, make_bundle
from .triton_server import serve

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


def _fake(bundle: Bundle, _settings: Settings) -> FakeBackend:
    return FakeBackend(bundle)


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root: Path = tmp_path_factory.mktemp("schema")
    models = [("digits", make_bundle(root / "digits")),
              ("shapes", make_bundle(root / "shapes", task="detect"))]
    with serve(models, Settings(max_delay_ms=0), _fake) as running:
        url = f"http://{running.http}"
        yield schemathesis.openapi.from_url(f"{url}/openapi.json").include(
            path_regex=r"^/(v2|metrics$|v1/models(/\{name\})?$)"
        )


# Operations are looped over inside one test per generation mode: schemathesis' pytest integration
# (from_fixture) does not run under this pytest version.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_openapi_conformance(api_schema: Any, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) > 15, [op.label for op in operations]
    for op in operations:

        @given(case=op.as_strategy(generation_mode=mode))
        # derandomize: the same examples on every run, so `make test` does not pass or fail by chance
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)
        def check(case: Any) -> None:
            case.call_and_validate(checks=CHECKS, timeout=10)

        try:
            check()
        except Unsatisfiable:  # negative mode: the operation takes nothing that can be made invalid
            assert mode is GenerationMode.NEGATIVE, op.label
