"""Critical path of one `--vm-type ec2` build under a stated EC2 latency model (run on demand).

    /work/venv/bin/python -m tests.bench.bench_ec2 [--model OP=SECONDS ...]

The calls are the ones the code really makes: the real `Ec2Backend` runs whole builds through
`cloudbuild.build.run_build` against moto (server mode, 127.0.0.1) with the emulated host and
builder of `tests/fakes/moto_server.py`, and every EC2 call is recorded through botocore's
`before-call` event, every wait through the `wait_for` the code calls. obs-build's EC2 sequence
(`build-vm-ec2`: attach, stage, detach, snapshot both volumes, register an AMI, run it, wait for
termination, deregister, attach the instance's volumes back, extract, delete) is replayed against
the same moto with the same recording, where obs-build polls.

moto is instant, so time comes from the model: a state-changing call finishes `MODEL[op]`
seconds after it is issued; calls issued back to back without a wait in between progress
together; a wait ends when everything outstanding has finished; every call costs one round
trip. The build itself takes zero seconds in all three flows, so what is left is pure overhead:
the time from "start the build" to "results extracted and every resource released".
No sleeps anywhere: nothing here waits for real.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Seconds. Typical figures for one region (published guidance and commonly observed times);
# pass --model OP=SECONDS to try others.
MODEL: dict[str, float] = {
    "rtt": 0.1,  # any API round trip (Describe*, CreateTags, ModifyInstanceAttribute, ...)
    "RunInstances": 12.0,  # pending -> running
    "StartInstances": 8.0,  # stopped -> running (EBS-backed builder of the warm pool)
    "StopInstances": 8.0,  # running -> stopped (only when a build did not power off)
    "TerminateInstances": 0.0,  # not waited for (cloudbuild); obs-build waits, see shutdown_terminate
    "CreateVolume": 2.0,  # creating -> available (empty gp3)
    "AttachVolume": 3.0,  # attaching -> attached
    "DetachVolume": 3.0,  # detaching -> available
    "DeleteVolume": 0.0,
    "CreateSnapshot": 120.0,  # pending -> completed: first (full) snapshot of a freshly staged volume
    "DeleteSnapshot": 0.0,
    "RegisterImage": 5.0,  # pending -> available
    "DeregisterImage": 0.0,
    "GetConsoleOutput": 0.0,  # a round trip only (polled while the build runs)
    "boot_fresh": 25.0,  # a new instance: firmware, kernel, first-boot init, lazily loaded AMI blocks
    "boot_warm": 10.0,  # a stopped pool builder: same OS, hydrated root volume, no first-boot work
    "shutdown_stop": 6.0,  # guest power-off -> stopped
    "shutdown_terminate": 15.0,  # guest power-off -> terminated (obs-build waits for this state)
    "detect_cloudbuild": 2.5,  # power-off noticed: half of cloudbuild's longest poll interval (5 s)
    "detect_obs": 0.5,  # obs-build polls every second
}

STATE_CHANGING = {
    "RunInstances",
    "StartInstances",
    "StopInstances",
    "TerminateInstances",
    "CreateVolume",
    "AttachVolume",
    "DetachVolume",
    "DeleteVolume",
    "CreateSnapshot",
    "DeleteSnapshot",
    "RegisterImage",
    "DeregisterImage",
}


IDS = re.compile(r"\b(?:vol|i|snap|ami)-[0-9a-f]+\b")


@dataclass
class Recording:
    # ("call", op, resource ids) | ("wait", what, resource ids named in `what`)
    events: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)

    def call(self, op: str, ids: tuple[str, ...]) -> None:
        self.events.append(("call", op, ids))

    def wait(self, what: str) -> None:
        self.events.append(("wait", what, tuple(IDS.findall(what))))

    def calls(self) -> list[str]:
        return [name for kind, name, _ in self.events if kind == "call"]


def call_ids(params: dict[str, Any], parsed: dict[str, Any]) -> tuple[str, ...]:
    """The resources a call acts on: from its parameters and, for creations, its answer."""
    ids: list[str] = []
    for key in ("VolumeId", "InstanceId", "SnapshotId", "ImageId"):
        for source in (params, parsed):
            value = source.get(key)
            if isinstance(value, str):
                ids.append(value)
    ids += [i for i in params.get("InstanceIds", []) if isinstance(i, str)]
    ids += [i["InstanceId"] for i in parsed.get("Instances", []) if isinstance(i, dict) and "InstanceId" in i]
    return tuple(dict.fromkeys(ids))


def critical_path(rec: Recording, model: dict[str, float], *, obs: bool = False) -> float:
    """Seconds from the first call to the last completion under `model`.

    A state-changing call on resources R finishes `model[op]` after it is issued; a wait naming
    resources ends when their last call finished (a wait naming none waits for everything). An
    instance boots `boot_fresh`/`boot_warm` after it runs, and its guest starts once it booted and
    the volumes attached to it are attached; a wait for its power-off ends a shutdown and a
    detection delay after that (the build itself takes no time). Every call costs a round trip.
    """
    t = 0.0
    done: dict[str, float] = {}
    booted: dict[str, float] = {}
    volumes_of: dict[str, list[str]] = {}
    for kind, name, ids in rec.events:
        if kind == "call":
            if name in STATE_CHANGING:
                finish = t + model.get(name, 0.0)
                for rid in ids:
                    done[rid] = max(done.get(rid, 0.0), finish)
                if name in ("RunInstances", "StartInstances"):
                    boot = model["boot_fresh" if name == "RunInstances" else "boot_warm"]
                    for rid in ids:
                        if rid.startswith("i-"):
                            booted[rid] = finish + boot
                if name == "AttachVolume":
                    volume = next((r for r in ids if r.startswith("vol-")), None)
                    instance = next((r for r in ids if r.startswith("i-")), None)
                    if volume and instance:
                        volumes_of.setdefault(instance, []).append(volume)
            t += model["rtt"]
            continue
        if "power off" in name:
            instance = next((r for r in ids if r.startswith("i-")), "")
            guest = max([booted.get(instance, t), *(done.get(v, 0.0) for v in volumes_of.get(instance, []))])
            shutdown = model["shutdown_terminate"] if obs else model["shutdown_stop"]
            detect = model["detect_obs"] if obs else model["detect_cloudbuild"]
            t = max(t, guest) + shutdown + detect
            for v in volumes_of.get(instance, []):
                done[v] = max(done.get(v, 0.0), t)
            continue
        waited = [done[r] for r in ids if r in done] if ids else list(done.values())
        t = max([t, *waited])
    return max([t, *done.values()])


# --- cloudbuild, for real against moto ----------------------------------------------------------


@contextlib.contextmanager
def moto_world() -> Iterator[Any]:
    """moto + fake IMDS + emulated host/builder, outside pytest (same fakes the tests use)."""
    os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = "false"
    from moto.server import ThreadedMotoServer

    import tests.fakes.moto_server as fx
    from cloudbuild import retry
    from cloudbuild.cloud.ec2.api import client
    from cloudbuild.cloud.ec2.devices import HostPaths
    from tests.fakes.imds import FakeImds

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    with urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10):
        pass
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": fx.REGION,
        "AWS_ENDPOINT_URL_EC2": url,
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    retry._sleep = lambda s: None  # moto is instant; the model supplies time
    with tempfile.TemporaryDirectory(prefix="bench-ec2-") as tmp_name:
        tmp = Path(tmp_name)
        ec2 = client(fx.REGION)
        ami = fx.register_ami(ec2, "cloudbuild-builder")
        worker = ec2.run_instances(
            ImageId=ami, MinCount=1, MaxCount=1, Placement={"AvailabilityZone": fx.ZONE}
        )["Instances"][0]["InstanceId"]
        imds = FakeImds(
            {"instance-id": worker, "placement/availability-zone": fx.ZONE, "placement/region": fx.REGION}
        )
        imds.start()
        paths = HostPaths(tmp / "dev", tmp / "sys")
        (paths.sys / "class" / "nvme").mkdir(parents=True)
        emulator = fx.HostEmulator(worker, paths, tmp / "images")
        emulator.start()
        world = fx.Ec2World(
            fx.Aws(url), ec2, worker, ami, imds, paths, tmp / "images", tmp / "state", emulator, tmp
        )
        try:
            yield world
        finally:
            emulator.stop()
            imds.stop()
            server.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@contextlib.contextmanager
def recording(ec2: Any) -> Iterator[Recording]:
    import cloudbuild.cloud.ec2.backend as ec2_backend
    import cloudbuild.cloud.ec2.gc as ec2_gc
    import cloudbuild.cloud.ec2.volume as ec2_volume

    modules = (ec2_backend, ec2_volume, ec2_gc)
    rec = Recording()
    real_wait_for: Callable[..., Any] = ec2_backend.wait_for
    params_of: dict[int, dict[str, Any]] = {}

    def on_params(params: dict[str, Any], context: dict[str, Any], **kwargs: Any) -> None:
        params_of[id(context)] = dict(params)

    def on_call(model: Any, parsed: dict[str, Any], context: dict[str, Any], **kwargs: Any) -> None:
        rec.call(model.name, call_ids(params_of.pop(id(context), {}), parsed))

    def wait_for(probe: Callable[[], Any], *, what: str, **kwargs: Any) -> Any:
        rec.wait(what)
        return real_wait_for(probe, what=what, **kwargs)

    ec2.meta.events.register("provide-client-params.ec2", on_params)
    ec2.meta.events.register("after-call.ec2", on_call)
    for module in modules:
        module.wait_for = wait_for  # type: ignore[attr-defined]
    try:
        yield rec
    finally:
        for module in modules:
            module.wait_for = real_wait_for  # type: ignore[attr-defined]
        ec2.meta.events.unregister("after-call.ec2", on_call)
        ec2.meta.events.unregister("provide-client-params.ec2", on_params)


def cloudbuild_build(world: Any, build_id: str, *, pool: int) -> Recording:
    from cloudbuild.build import BuildJob, run_build
    from tests.fakes.console import RecordingConsole
    from tests.fakes.hoststeps import FakeHostSteps

    backend = world.backend(ec2_pool=pool, limits=_limits())
    with recording(world.ec2) as rec:
        outcome = run_build(
            BuildJob(build_id, world.tmp / f"dest-{build_id}", world.tmp / f"work-{build_id}"),
            backend,
            FakeHostSteps(),
            RecordingConsole(),
        )
    if outcome.exit_code != 0:
        raise SystemExit(f"bench build {build_id} failed: {outcome.message}")
    return rec


def _limits() -> Any:
    from cloudbuild.cloud.ec2.api import Ec2Limits

    return Ec2Limits(poll=0.001, poll_max=0.005, console_poll_max=0.005)


# --- obs-build's sequence, replayed against the same moto ------------------------------------------


def obs_build(world: Any) -> Recording:
    """build-vm-ec2 + build-vm's order of calls; waits where obs-build polls."""
    ec2 = world.ec2
    zone = "us-east-1a"
    # VM_ROOT / VM_SWAP: volumes obs-build is given (created outside the build, not counted)
    root = ec2.create_volume(AvailabilityZone=zone, Size=4)["VolumeId"]
    swap = ec2.create_volume(AvailabilityZone=zone, Size=1)["VolumeId"]

    def state(volume: str) -> str:
        vols = ec2.describe_volumes(VolumeIds=[volume])["Volumes"]
        att = vols[0].get("Attachments") or [{}]
        return str(att[0].get("State", vols[0]["State"]))

    with recording(ec2) as rec:
        ec2.attach_volume(VolumeId=root, InstanceId=world.worker_id, Device="/dev/sdz")
        rec.wait(f"{root} attached")
        state(root)
        # mkfs + staging on the root (not counted); swap: attach, zero the head, detach
        ec2.attach_volume(VolumeId=swap, InstanceId=world.worker_id, Device="/dev/sdy")
        rec.wait(f"{swap} attached")
        state(swap)
        ec2.detach_volume(VolumeId=swap, InstanceId=world.worker_id)
        ec2.detach_volume(VolumeId=root, InstanceId=world.worker_id)
        snap_root = ec2.create_snapshot(VolumeId=root)["SnapshotId"]
        snap_swap = ec2.create_snapshot(VolumeId=swap)["SnapshotId"]
        rec.wait(f"{snap_root} {snap_swap} completed")
        ec2.describe_snapshots(SnapshotIds=[snap_root, snap_swap])
        image = ec2.register_image(
            Name=f"build-{root}",
            Architecture="x86_64",
            RootDeviceName="/dev/sda1",
            BlockDeviceMappings=[
                {"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snap_root, "DeleteOnTermination": False}},
                {"DeviceName": "/dev/sdb1", "Ebs": {"SnapshotId": snap_swap, "DeleteOnTermination": False}},
            ],
        )["ImageId"]
        rec.wait(f"{image} available")
        instance = ec2.run_instances(
            ImageId=image,
            MinCount=1,
            MaxCount=1,
            InstanceType="t3.micro",
            Placement={"AvailabilityZone": zone},
            InstanceInitiatedShutdownBehavior="terminate",
        )["Instances"][0]["InstanceId"]
        rec.wait(f"builder {instance} to power off")  # obs-build polls until terminated
        ec2.describe_instances(InstanceIds=[instance])
        ec2.get_console_output(InstanceId=instance)
        ec2.terminate_instances(InstanceIds=[instance])  # moto: what the guest's power-off does
        ec2.deregister_image(ImageId=image)
        # the instance's volumes (restored from the snapshots) become the extract volumes
        extract = [
            ec2.create_volume(AvailabilityZone=zone, Size=4, SnapshotId=snap_root)["VolumeId"],
            ec2.create_volume(AvailabilityZone=zone, Size=1, SnapshotId=snap_swap)["VolumeId"],
        ]
        rec.events = [e for e in rec.events if e[:2] != ("call", "CreateVolume")]  # RunInstances made them
        ec2.attach_volume(VolumeId=extract[0], InstanceId=world.worker_id, Device="/dev/sdz")
        rec.wait(f"{extract[0]} attached")
        ec2.attach_volume(VolumeId=extract[1], InstanceId=world.worker_id, Device="/dev/sdy")
        rec.wait(f"{extract[1]} attached")
        # BUILDSTATUS + extraction (not counted); vm_cleanup_ec2:
        for volume in (root, swap, *extract):
            with contextlib.suppress(Exception):
                ec2.detach_volume(VolumeId=volume, InstanceId=world.worker_id)
        rec.wait(" ".join([root, swap, *extract]) + " detached")  # needed before the delete
        ec2.delete_snapshot(SnapshotId=snap_root)
        ec2.delete_snapshot(SnapshotId=snap_swap)
        for volume in extract:
            ec2.delete_volume(VolumeId=volume)
    for volume in (root, swap):
        ec2.delete_volume(VolumeId=volume)
    return rec


# --- report -------------------------------------------------------------------------------------


def summarize(name: str, rec: Recording, model: dict[str, float], *, obs: bool = False) -> float:
    seconds = critical_path(rec, model, obs=obs)
    calls = rec.calls()
    counted = {op: calls.count(op) for op in sorted(set(calls))}
    waits = sum(1 for kind, _, _ in rec.events if kind == "wait")
    print(f"\n{name}: {seconds:6.1f} s critical path, {len(calls)} API calls, {waits} waits")
    print("  " + ", ".join(f"{op} {n}" for op, n in counted.items()))
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], metavar="OP=SECONDS")
    args = parser.parse_args(argv)
    model = dict(MODEL)
    for item in args.model:
        op, _, value = item.partition("=")
        if op not in model:
            parser.error(f"unknown model entry {op!r} (one of {', '.join(model)})")
        model[op] = float(value)

    from cloudbuild import log as cblog

    cblog.configure("json", stream=open(os.devnull, "w"))  # noqa: SIM115 - for the process
    print("latency model (seconds):")
    for op, seconds in model.items():
        print(f"  {op:<20} {seconds:6.1f}")
    with moto_world() as world:
        cold = cloudbuild_build(world, "cold", pool=0)
        cloudbuild_build(world, "fill-pool", pool=1)  # launches the pool's builder
        warm = cloudbuild_build(world, "warm", pool=1)
        obs = obs_build(world)
        for instance in world.ec2.describe_instances()["Reservations"]:
            for i in instance["Instances"]:
                if i["InstanceId"] != world.worker_id:
                    world.ec2.terminate_instances(InstanceIds=[i["InstanceId"]])
    t_cold = summarize("cloudbuild, cold (run + terminate a builder)", cold, model)
    t_warm = summarize("cloudbuild, warm pool (start + stop a pooled builder)", warm, model)
    t_obs = summarize("obs-build (snapshot -> AMI -> run -> reattach)", obs, model, obs=True)
    ratio = t_warm / t_obs
    print(f"\nwarm / obs-build = {ratio:.2f} (target <= 0.33); cold / obs-build = {t_cold / t_obs:.2f}")
    return 0 if ratio <= 1 / 3 else 1


if __name__ == "__main__":
    sys.exit(main())
