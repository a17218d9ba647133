"""schemathesis against `/openapi.json` of the running platform (a real `iiot run` process).

Every operation gets valid and invalid generated requests; no answer may be a 500, carry a
status the schema does not document, or have a body outside its documented schema.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support import ADMIN_PASSWORD, free_port, platform_env, platform_process

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_OPERATION = int(os.environ.get("IIOT_FUZZ_EXAMPLES", "30"))


@pytest.fixture(scope="module")
def platform_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A platform process with HTTP on (SQLite)."""
    port = free_port()
    data_dir: Path = tmp_path_factory.mktemp("fuzz")
    with platform_process(platform_env(data_dir, IIOT_HTTP_PORT=str(port))) as process:
        yield f"http://127.0.0.1:{port}"
        assert process.poll() is None, "the platform died during fuzzing"


@pytest.fixture(scope="module")
def known(platform_url: str) -> dict[str, Any]:
    """The sysadmin's header and a real device with data, so fuzzing also reaches past 404."""
    answer = requests.post(
        f"{platform_url}/api/auth/login",
        json={"username": "admin", "password": ADMIN_PASSWORD},
        timeout=30,
    )
    answer.raise_for_status()
    headers = {"Authorization": f"Bearer {answer.json()['access_token']}"}
    tenant = requests.post(
        f"{platform_url}/api/tenants", json={"name": "fuzz"}, headers=headers, timeout=30
    ).json()
    device = requests.post(
        f"{platform_url}/api/devices",
        json={"name": "fuzzed", "tenant_id": tenant["id"]},
        headers=headers,
        timeout=30,
    ).json()
    body = [
        {"ts": 1_767_225_600_000 + i * 1000, "values": {"t": i, "s": "x", "b": True}}
        for i in range(100)
    ]
    sent = requests.post(
        f"{platform_url}/api/v1/{device['token']}/telemetry", json=body, timeout=30
    )
    assert sent.status_code == 200, sent.text
    return {"headers": headers, "device_id": device["id"], "tenant_id": tenant["id"]}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_openapi_conformance(
    platform_url: str, known: dict[str, Any], mode: GenerationMode
) -> None:
    # Driven through Hypothesis directly: schemathesis' lazy pytest loader does not work with
    # this pytest version, and the schema only exists once the platform runs.
    schema = schemathesis.openapi.from_url(f"{platform_url}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],  # a failure is reported unshrunk, fast
        )
        def run(case: Any) -> None:
            # Reads of the real device go past the 404 into query parsing and the store.
            if (
                case.method == "GET"
                and "device_id" in (case.path_parameters or {})
                and len(repr(case.query)) % 2 == 0
            ):
                case.path_parameters["device_id"] = known["device_id"]
            case.call_and_validate(headers=known["headers"], checks=CHECKS)

        try:
            run()
        except Unsatisfiable:
            continue  # nothing to make invalid (an operation without parameters)
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.label}: {exc}")
    assert operations >= 20
    assert not failures, "\n\n".join(failures)


def test_schema_documents_400_not_422(platform_url: str) -> None:
    document = requests.get(f"{platform_url}/openapi.json", timeout=30).json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
    assert "/api/v1/{token}/telemetry" in document["paths"]
    docs = requests.get(f"{platform_url}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
