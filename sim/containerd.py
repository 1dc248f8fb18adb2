"""A private containerd on a simulated node, driven over CRI as kubelet drives it.

`Containerd(node, cni_bin_dir, cni_conf_dir)` starts Debian's `containerd` inside the node's
network namespace with a configuration of its own: root, state, gRPC and ttrpc sockets and runc's
state all under one temporary directory (the machine's containerd service,
if any, is never touched), the CRI plugin's CNI bin and conf dirs given by the caller, and a
sandbox ("pause") image built here.  Since containerd runs in the node netns, the CNI `bridge`
plugin puts the bridge there and every pod sandbox gets a veth into it: the pods are on the same
L2 network as the node's `SimNode.add_pod` pods, and nothing reaches the machine's own network.
containerd is started with `nsenter --net` (not `ip netns exec`, which would give it a mount
namespace of its own): it binds each pod's netns at /var/run/netns/cni-<uuid> (its default),
a shared mount, so the agent, in the mount namespace `ip netns exec` gave it, sees them, as a
DaemonSet's agent sees the host's through a HostToContainer mount.

The image (`build_image`) is a one-layer OCI image made here from Debian's `busybox-static`
(`/bin/busybox` plus applet symlinks), imported with `ctr images import` into the CRI's
`k8s.io` namespace: no registry.  Its default command sleeps forever, which makes it the
sandbox image too.  `restrict_oom_score_adj` is on because these machines lack
CAP_SYS_RESOURCE, which the sandbox's default OOM score adjustment (-998) needs.

`cri` is a client of the CRI RuntimeService (`sim/cri/api.proto`, a subset of k8s.io/cri-api;
Python stubs generated with grpcio-tools into the temporary directory on first use).
`run_pod` is kubelet's RunPodSandbox with the pod's name, namespace and UID, which containerd
passes to the CNI chain as K8S_POD_NAME, K8S_POD_NAMESPACE, K8S_POD_UID and
K8S_POD_INFRA_CONTAINER_ID; `start_container` creates and starts an app container in it
(CreateContainer, StartContainer), logging to a file; `remove_pod` is StopPodSandbox (CNI DEL)
then RemovePodSandbox.

`stop()` removes everything, also after a failure: every pod sandbox it made, then containerd,
then any shim still running for this containerd (found by its socket address on the command
line), pod netns mounts left behind, mounts under the temporary directory, and the directory.
It is idempotent.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sim.node import SimNode

BUSYBOX = Path("/bin/busybox")
IMAGE = "docker.io/local/ferry-busybox:1"
APPLETS = ("sh", "sleep", "nc", "echo", "cat", "ip", "wget", "true", "printf", "date")
PROTO = Path(__file__).resolve().parent / "cri" / "api.proto"
_READY_TIMEOUT = 30.0


class ContainerdError(RuntimeError):
    """containerd did not start, or a CRI call or ctr command failed; the message says why."""


def _blob(directory: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (directory / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _layer() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("bin", "tmp", "proc", "sys", "dev", "etc"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(BUSYBOX), arcname="bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
    return buffer.getvalue()


def build_image(path: Path) -> Path:
    """Write an OCI image tarball of busybox-static at `path` (see the module doc)."""
    if not BUSYBOX.exists():
        raise ContainerdError(f"{BUSYBOX} is missing (Debian package busybox-static)")
    work = Path(tempfile.mkdtemp(prefix="ferry-oci-"))
    try:
        (work / "blobs" / "sha256").mkdir(parents=True)
        layer = _layer()
        layer_desc = _blob(work, layer)
        config = {
            "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(
                os.uname().machine, "amd64"
            ),
            "os": "linux",
            "config": {"Cmd": ["/bin/sleep", "2147483647"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
        }
        config_desc = _blob(work, json.dumps(config).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer_desc}],
        }
        manifest_desc = _blob(work, json.dumps(manifest).encode())
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    **manifest_desc,
                    "annotations": {"io.containerd.image.name": IMAGE},
                }
            ],
        }
        (work / "index.json").write_text(json.dumps(index))
        (work / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        with tarfile.open(path, "w") as tar:
            for entry in ("oci-layout", "index.json", "blobs"):
                tar.add(str(work / entry), arcname=entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def cri_stubs(directory: Path) -> tuple[Any, Any]:
    """The generated (api_pb2, api_pb2_grpc) modules for `sim/cri/api.proto`."""
    if "ferry_cri_pb2" in sys.modules:
        return sys.modules["ferry_cri_pb2"], sys.modules["ferry_cri_pb2_grpc"]
    from grpc_tools import protoc  # type: ignore[import-untyped]  # grpcio-tools (dev)

    out = directory / "cri-stubs"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROTO, out / "ferry_cri.proto")
    status = protoc.main(
        ["protoc", f"-I{out}", f"--python_out={out}", f"--grpc_python_out={out}",
         str(out / "ferry_cri.proto")]
    )  # fmt: skip
    if status != 0:
        raise ContainerdError(f"protoc failed on {PROTO} (status {status})")
    sys.path.insert(0, str(out))
    try:
        return (
            importlib.import_module("ferry_cri_pb2"),
            importlib.import_module("ferry_cri_pb2_grpc"),
        )
    finally:
        sys.path.remove(str(out))


class Containerd:
    def __init__(self, node: SimNode, cni_bin_dir: Path, cni_conf_dir: Path) -> None:
        self.node = node
        self.dir = Path(tempfile.mkdtemp(prefix="ferry-ctd-"))  # short: socket paths < 108 B
        self.socket = self.dir / "ctd.sock"
        self.config = self.dir / "config.toml"
        self.log = self.dir / "containerd.log"
        self.logs = self.dir / "pods"
        self.cni_bin_dir = cni_bin_dir
        self.cni_conf_dir = cni_conf_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.pods: dict[str, Any] = {}  # sandbox id -> its config (for CreateContainer)
        self.netns: set[str] = set()  # the pod netns mounts seen, removed by stop() if left
        self._channel: Any = None
        self.pb: Any = None
        self.cri: Any = None
        self._stopped = False

    # ---------------------------------------------------------------- lifecycle
    def _write_config(self) -> None:
        d = self.dir
        self.config.write_text(
            f"""\
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{d}/runc"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{self.cni_bin_dir}"
    conf_dir = "{self.cni_conf_dir}"
    max_conf_num = 1
"""
        )

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise

    def _start(self) -> None:
        for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"):
            if shutil.which(tool) is None:
                raise ContainerdError(f"`{tool}` is missing (Debian packages containerd, runc)")
        self._write_config()
        log = open(self.log, "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(  # the node's netns, the machine's mount namespace
            ["nsenter", f"--net={self.node.netns_path}", "containerd", "--config",
             str(self.config), "--log-level", "info"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.node.processes.append(self.process)  # the node's teardown kills it too
        deadline = time.monotonic() + _READY_TIMEOUT
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise ContainerdError(f"containerd did not start:\n{self.log_tail()}")
            time.sleep(0.05)
        image = build_image(self.dir / "image.tar")
        self.ctr("images", "import", str(image))  # named by its io.containerd.image.name
        import grpc  # type: ignore[import-untyped]

        self.pb, grpc_stubs = cri_stubs(self.dir)
        self._channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.cri = grpc_stubs.RuntimeServiceStub(self._channel)
        while True:  # the CRI plugin serves a moment after the socket exists
            try:
                self.cri.Version(self.pb.VersionRequest(version="v1"), timeout=5)
                break
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise ContainerdError(
                        f"containerd's CRI service does not answer: {exc}\n{self.log_tail()}"
                    ) from None
                time.sleep(0.1)

    def ctr(self, *args: str, namespace: str = "k8s.io") -> str:
        result = subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", namespace, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise ContainerdError(f"ctr {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def log_tail(self, size: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-size:]
        return ""

    # --------------------------------------------------------------------- CRI
    def run_pod(self, name: str, namespace: str, timeout: float = 60.0) -> str:
        """RunPodSandbox for pod `namespace/name` (a fresh UID); its sandbox id."""
        config = self.pb.PodSandboxConfig(
            metadata=self.pb.PodSandboxMetadata(
                name=name, namespace=namespace, uid=str(uuid.uuid4()), attempt=0
            ),
            hostname=name,
            log_directory=str(self.logs / f"{namespace}_{name}"),
        )
        reply = self.cri.RunPodSandbox(self.pb.RunPodSandboxRequest(config=config), timeout=timeout)
        self.pods[reply.pod_sandbox_id] = config
        self.pod_status(reply.pod_sandbox_id)  # notes its netns
        return str(reply.pod_sandbox_id)

    def pod_status(self, sandbox: str) -> tuple[str, str]:
        """(the pod's IPv4 address, its network namespace path)."""
        reply = self.cri.PodSandboxStatus(
            self.pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox, verbose=True), timeout=30
        )
        info = json.loads(reply.info["info"])
        namespaces = info["runtimeSpec"]["linux"]["namespaces"]
        netns = str(next(n["path"] for n in namespaces if n["type"] == "network"))
        self.netns.add(netns)
        return str(reply.status.network.ip), netns

    def start_container(self, sandbox: str, name: str, command: list[str]) -> str:
        """Create and start container `name` running `command` in the sandbox; its id."""
        config = self.pb.ContainerConfig(
            metadata=self.pb.ContainerMetadata(name=name),
            image=self.pb.ImageSpec(image=IMAGE),
            command=command,
            log_path=f"{name}.log",
        )
        created = self.cri.CreateContainer(
            self.pb.CreateContainerRequest(
                pod_sandbox_id=sandbox, config=config, sandbox_config=self.pods[sandbox]
            ),
            timeout=60,
        )
        self.cri.StartContainer(
            self.pb.StartContainerRequest(container_id=created.container_id), timeout=60
        )
        return str(created.container_id)

    def wait_exited(self, sandbox: str, container: str, timeout: float = 30.0) -> tuple[int, str]:
        """Wait for the container to exit: (exit code, what it wrote on stdout and stderr)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.cri.ContainerStatus(
                self.pb.ContainerStatusRequest(container_id=container), timeout=30
            ).status
            if status.state == self.pb.CONTAINER_EXITED:
                break
            if time.monotonic() > deadline:
                raise ContainerdError(f"container {container} still running after {timeout} s")
            time.sleep(0.1)
        config = self.pods[sandbox]
        log = Path(config.log_directory) / f"{status.metadata.name}.log"
        lines = log.read_text().splitlines() if log.exists() else []
        # CRI log format: "<time> <stream> <P|F> <text>"
        output = "\n".join(line.split(" ", 3)[3] for line in lines if line.count(" ") >= 3)
        return int(status.exit_code), output

    def remove_pod(self, sandbox: str) -> None:
        """StopPodSandbox (the CNI DEL) and RemovePodSandbox."""
        self.cri.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=sandbox), timeout=60)
        self.cri.RemovePodSandbox(
            self.pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox), timeout=60
        )
        self.pods.pop(sandbox, None)

    # ---------------------------------------------------------------- teardown
    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        errors = []
        if self.cri is not None:
            for sandbox in list(self.pods):
                try:
                    self.remove_pod(sandbox)
                except Exception as exc:
                    errors.append(f"removing pod sandbox {sandbox}: {exc}")
        if self._channel is not None:
            self._channel.close()
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self._kill_shims()
        for netns in self.netns:  # containerd removes them on StopPodSandbox; not if it died
            if os.path.exists(netns):
                subprocess.run(["umount", netns], capture_output=True, check=False)
                with contextlib.suppress(OSError):
                    os.unlink(netns)
        self._unmount()
        shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise ContainerdError("; ".join(errors))

    def _kill_shims(self) -> None:
        """Shims outlive containerd by design; this containerd's are found by its address."""
        needle = str(self.socket).encode()
        for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and needle in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

    def _unmount(self) -> None:
        prefix = str(self.dir) + "/"
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for target in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)
