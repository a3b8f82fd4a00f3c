"""`dcml submit` talking to a Kubeflow Pipelines API: every failure is one line naming the option to fix.

kfp.Client on an unreachable host retries its health check for half a minute,
logging a traceback per try; a refused login or a wrong namespace comes back as
an ApiException carrying the whole HTTP exchange. Here the host is asked once,
directly (``GET /apis/v2beta1/healthz``, a few seconds at most), before
kfp.Client is made, and whatever the API answers later becomes a DcmlError.
:func:`run_request` is what :func:`submit` would send (``submit --dry-run``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import urllib.error
import urllib.request
import warnings

from dcml.contracts.errors import DcmlError

HEALTHZ = "/apis/v2beta1/healthz"
RUNS = "/apis/v2beta1/runs"
TOKEN_ENV = "DCML_KFP_TOKEN"


def check_host(host: str, token: str | None = None, timeout: float = 10.0) -> dict:
    """The API's health record ({"multi_user": ..., ...}); an unreachable or wrong host, or refused
    credentials, are one-line DcmlErrors."""
    if not host.startswith(("http://", "https://")):
        raise DcmlError(f"--host {host}: expected the http:// or https:// address of the Kubeflow Pipelines API, "
                        "e.g. https://kfp.example.com")
    request = urllib.request.Request(host.rstrip("/") + HEALTHZ,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(1 << 16)
    except urllib.error.HTTPError as exc:
        raise DcmlError(refusal(host, exc.code, exc.reason, message_of(exc.read(1 << 12)))) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split())
        raise DcmlError(f"--host {host}: cannot reach the Kubeflow Pipelines API ({reason}); check the address "
                        "and that this machine reaches the cluster (e.g. kubectl port-forward)") from None
    try:
        info = json.loads(body)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise DcmlError(f"--host {host}: {HEALTHZ} answered with a page, not the Kubeflow Pipelines API (a login "
                        f"page?); pass the API's own address, or credentials with --token (${TOKEN_ENV})")
    return info


def message_of(body) -> str:
    """The error text of an API answer (its JSON "message"/"error", else the text), one line, short."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    text = str(body or "")
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            text = str(data.get("message") or data.get("error") or text)
    except ValueError:
        pass
    text = " ".join(text.split())
    return text[:200] + ("..." if len(text) > 200 else "")


def refusal(host: str, status: int, reason, message: str, namespace: str | None = None) -> str:
    """The one line for an HTTP error answer of the KFP API."""
    detail = f"{status} {reason or ''}".strip() + (f": {message}" if message else "")
    if status == 401:
        return (f"--host {host}: the Kubeflow Pipelines API refused the credentials ({detail}); pass a valid "
                f"token with --token (or ${TOKEN_ENV})")
    if namespace and (status in (403, 404) or "namespace" in message.lower()):
        return (f"--namespace {namespace}: the Kubeflow Pipelines API at {host} refused it ({detail}); pass a "
                "namespace (Kubeflow profile) these credentials may use")
    if status == 403:
        return (f"--host {host}: the Kubeflow Pipelines API refused access ({detail}); pass credentials allowed "
                f"to create runs with --token (or ${TOKEN_ENV}), and --namespace on a multi-user Kubeflow")
    if status == 404:
        return (f"--host {host}: no Kubeflow Pipelines v2 API there ({detail}); pass the address that serves "
                f"{HEALTHZ}")
    return f"--host {host}: the Kubeflow Pipelines API refused the request ({detail})"


def run_request(run_name: str, experiment: str, namespace: str | None, arguments: dict) -> dict:
    """The run :func:`submit` asks for: the experiment it looks up (or creates) by name, then the body
    of ``POST /apis/v2beta1/runs`` (kfp.Client's V2beta1Run; the pipeline spec is the compiled YAML)."""
    return {
        "experiment": {"display_name": experiment, "namespace": namespace,
                       "note": "looked up by name; created when missing"},
        "create_run": {"method": "POST", "path": RUNS, "body": {
            "display_name": run_name,
            "experiment_id": f"<id of experiment {experiment!r}>",
            "pipeline_spec": "<the compiled pipeline YAML, pipeline.yaml>",
            "runtime_config": {"parameters": arguments},
        }},
    }


@contextlib.contextmanager
def _quiet_kfp():
    """kfp.Client prints links and warnings and logs retries: none of it reaches the terminal."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def preflight(host: str, token: str | None = None, namespace: str | None = None, timeout: float = 10.0) -> dict:
    """:func:`check_host`, and a namespace where the API is multi-user (before anything is compiled)."""
    info = check_host(host, token, timeout)
    if info.get("multi_user") and not namespace:
        raise DcmlError(f"--host {host}: this Kubeflow is multi-user; pass --namespace (your profile's namespace)")
    return info


def submit(host: str, package: str, arguments: dict, run_name: str, experiment: str,
           namespace: str | None = None, token: str | None = None) -> str:
    """Create a run of the compiled ``package`` on the KFP at ``host`` (after :func:`preflight`); returns
    the run's id."""
    import kfp
    import kfp_server_api
    import urllib3

    try:
        with _quiet_kfp():
            client = kfp.Client(host=host, namespace=namespace, existing_token=token)
            result = client.create_run_from_pipeline_package(package, arguments=arguments, run_name=run_name,
                                                             experiment_name=experiment, namespace=namespace)
    except kfp_server_api.ApiException as exc:
        if not exc.status:  # kfp_server_api's wrapping of a TLS failure
            raise DcmlError(f"--host {host}: the connection failed ({message_of(exc.reason)})") from None
        raise DcmlError(refusal(host, exc.status, exc.reason, message_of(exc.body), namespace)) from None
    except ValueError as exc:  # kfp.Client's own checks (two experiments of that name, ...)
        raise DcmlError(f"--experiment {experiment}: {message_of(str(exc))}") from None
    except (urllib3.exceptions.HTTPError, OSError, TimeoutError) as exc:
        raise DcmlError(f"--host {host}: the connection failed while submitting ({message_of(str(exc))}); "
                        "try again, or check the cluster") from None
    return result.run_id
