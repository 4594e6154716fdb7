"""A whole lifecycle through a Python client generated from the server's OpenAPI document
(openapi-python-client): create, start, wait for the operation, read the console, stop,
delete. Run by tests/api_contract.rs with the generated package on PYTHONPATH and KILN_URL,
KILN_TOKEN naming a `kiln serve` on TCP; any deviation from the document fails it."""

import os
import sys
import time

from kiln_api import AuthenticatedClient
from kiln_api.api.instances import (
    instance_action,
    instance_console,
    instance_create,
    instance_delete,
    instance_get,
)
from kiln_api.api.operations import operation_wait
from kiln_api.api.server import server_info
from kiln_api.models import (
    ActionKind,
    ActionRequest,
    BootSpec,
    ErrorBody,
    Instance,
    InstanceCreate,
    InstanceState,
    Operation,
    OperationState,
    ServerInfoResponse,
)

NAME = "py-lifecycle"


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def main():
    client = AuthenticatedClient(
        base_url=os.environ["KILN_URL"],
        token=os.environ["KILN_TOKEN"],
        raise_on_unexpected_status=True,
        timeout=120.0,
    )
    info = server_info.sync(client=client)
    check(isinstance(info, ServerInfoResponse) and info.name == "kiln", "GET /v1")

    spec = InstanceCreate(
        name=NAME,
        vcpus=1,
        memory="64MiB",
        boot=BootSpec(kernel="kiln-probe", cmdline="console=ttyS0 probe=wait-powerbutton"),
    )
    created = instance_create.sync_detailed(client=client, body=spec)
    check(created.status_code == 201, f"create: {created.status_code} {created.content!r}")
    inst = created.parsed
    check(isinstance(inst, Instance) and inst.state == InstanceState.STOPPED, "created stopped")
    check(created.headers.get("etag", "").startswith('"'), "create has an ETag")
    check(created.headers.get("location") == f"/v1/instances/{inst.id}", "create has a Location")

    started = instance_action.sync_detailed(
        NAME, client=client, body=ActionRequest(action=ActionKind.START)
    )
    check(started.status_code == 202, f"start: {started.status_code} {started.content!r}")
    op = started.parsed
    check(isinstance(op, Operation) and op.kind == "instance.start", "start is an operation")
    done = operation_wait.sync(str(op.id), client=client, timeout_s=60)
    check(
        isinstance(done, Operation) and done.state == OperationState.SUCCEEDED,
        f"the start succeeded: {done}",
    )
    inst = instance_get.sync(NAME, client=client)
    check(isinstance(inst, Instance) and inst.state == InstanceState.RUNNING, "running")

    deadline = time.time() + 30
    text = ""
    while "PROBE-OK wait-powerbutton armed" not in text and time.time() < deadline:
        console = instance_console.sync_detailed(NAME, client=client)
        check(console.status_code == 200, "console")
        text = console.parsed
        time.sleep(0.1)
    check("KILN-PROBE" in text and "armed" in text, "the guest's banner in the console")
    check(int(console.headers["x-console-end"]) >= len(text.encode()), "x-console-end")

    stopped = instance_action.sync_detailed(
        NAME,
        client=client,
        body=ActionRequest(action=ActionKind.STOP, timeout_s=30),
        wait=True,
    )
    check(stopped.status_code == 200, f"stop: {stopped.status_code} {stopped.content!r}")
    check(stopped.parsed.state == InstanceState.STOPPED, "stopped")

    again = instance_action.sync_detailed(
        NAME, client=client, body=ActionRequest(action=ActionKind.STOP)
    )
    check(
        again.status_code == 409
        and isinstance(again.parsed, ErrorBody)
        and again.parsed.error.code.value == "invalid_state",
        "a second stop is invalid_state",
    )

    deleted = instance_delete.sync_detailed(NAME, client=client)
    check(deleted.status_code == 204, f"delete: {deleted.status_code}")
    gone = instance_get.sync_detailed(NAME, client=client)
    check(gone.status_code == 404 and gone.parsed.error.code.value == "not_found", "gone")
    print("LIFECYCLE-OK")


main()
