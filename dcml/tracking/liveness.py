"""Is a RUNNING pipeline run still being logged, or did its track step die?

A track step killed mid-way (kill -9, OOM, a node lost) leaves its MLflow
parent run RUNNING forever. Every parent run therefore carries:

* ``dcml.owner``: JSON of the logging process: host name, boot id, pid
  namespace, pid and the process's start time (from /proc, so a reused pid is
  not mistaken for the owner);
* ``dcml.heartbeat``: Unix time, refreshed every HEARTBEAT_S seconds while
  the run is being logged.

A RUNNING run is dead when its owner is on this machine (same host, boot and
pid namespace) and that process is gone (or is another process now, or a
zombie); for an owner elsewhere (another host or container), when its
heartbeat is older than LEASE_S. Dead runs (and their RUNNING stage runs) are
marked KILLED, with a ``dcml.reaped`` tag saying why, by the next track step
in the store and by ``dcml compare``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

OWNER_TAG = "dcml.owner"
HEARTBEAT_TAG = "dcml.heartbeat"
REAPED_TAG = "dcml.reaped"
HEARTBEAT_S = 30.0
LEASE_S = 600.0  # 20 missed heartbeats


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, None when it does not exist."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)", which may hold spaces
    return fields[0], fields[19]


def owner() -> dict:
    """This process, as recorded in ``dcml.owner``."""
    stat = _proc_stat(os.getpid())
    return {"host": socket.gethostname(), "boot": _read("/proc/sys/kernel/random/boot_id"),
            "pidns": _pid_namespace(), "pid": os.getpid(), "start": stat[1] if stat else ""}


def owner_tags() -> dict[str, str]:
    return {OWNER_TAG: json.dumps(owner(), sort_keys=True), HEARTBEAT_TAG: f"{time.time():.0f}"}


def _process_gone(who: dict) -> str | None:
    """Why the owner process (on this machine) is gone, or None while it runs."""
    pid = int(who.get("pid", 0))
    gone = f"process {pid} on {who.get('host')} is gone"
    if not os.path.isdir("/proc"):  # no procfs: existence only
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return gone
        except PermissionError:
            pass
        return None
    stat = _proc_stat(pid)
    if stat is None:
        return gone
    state, start = stat
    if who.get("start") and start != who["start"]:
        return f"{gone} (the pid now belongs to another process)"
    if state in ("Z", "X"):
        return f"{gone} (exited, not yet reaped by its parent)"
    return None


def why_dead(tags: dict, start_time_ms: int | None = None, now: float | None = None) -> str | None:
    """Why a RUNNING run's logger is dead, or None while it may still be alive."""
    now = time.time() if now is None else now
    try:
        who = json.loads(tags.get(OWNER_TAG, "") or "{}")
    except json.JSONDecodeError:
        who = {}
    here = owner()
    if who and all(who.get(k) == here[k] for k in ("host", "boot", "pidns")) and who.get("pid"):
        return _process_gone(who)
    beat = tags.get(HEARTBEAT_TAG)
    try:
        last = float(beat) if beat else (start_time_ms or 0) / 1000
    except ValueError:
        last = (start_time_ms or 0) / 1000
    if last and now - last > LEASE_S:
        where = f"on {who['host']}" if who.get("host") else "(no owner recorded)"
        return f"no heartbeat for {now - last:.0f} s from its track step {where}"
    return None


class Heartbeat:
    """Refresh ``dcml.heartbeat`` on a run every ``every`` seconds until stopped."""

    def __init__(self, client, run_id: str, every: float = HEARTBEAT_S):
        self.client, self.run_id, self.every = client, run_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="dcml-heartbeat", daemon=True)

    def _beat(self):
        while not self._stop.wait(self.every):
            try:
                self.client.set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            except Exception:  # noqa: BLE001 - a missed beat is not worth failing the run
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def reap_dead_runs(client, experiment_ids: list[str] | None = None, now: float | None = None) -> list[str]:
    """Mark RUNNING dcml pipeline runs whose track step died KILLED (with their
    RUNNING stage runs); returns the ids of the parent runs marked."""
    from mlflow.entities import ViewType

    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not experiment_ids:
        return []
    running = client.search_runs(experiment_ids, filter_string=(
        "tags.`dcml.kind` = 'pipeline' and attributes.status = 'RUNNING'"), run_view_type=ViewType.ALL,
        max_results=1000)
    reaped = []
    for run in running:
        reason = why_dead(run.data.tags, run.info.start_time, now)
        if reason is None:
            continue
        beat = run.data.tags.get(HEARTBEAT_TAG)
        end_ms = int(float(beat) * 1000) if beat and beat.replace(".", "", 1).isdigit() else int(time.time() * 1000)
        end_ms = max(end_ms, run.info.start_time or 0)
        children = client.search_runs([run.info.experiment_id], filter_string=(
            f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and attributes.status = 'RUNNING'"),
            run_view_type=ViewType.ALL)
        for child in children:
            client.set_tag(child.info.run_id, REAPED_TAG, reason)
            client.set_terminated(child.info.run_id, status="KILLED", end_time=max(end_ms, child.info.start_time or 0))
        client.set_tag(run.info.run_id, REAPED_TAG, reason)
        client.set_terminated(run.info.run_id, status="KILLED", end_time=end_ms)
        reaped.append(run.info.run_id)
    return reaped
