#!/usr/bin/env python3
"""Run a Flower app on a real local deployment: TLS, SuperNode authentication, N SuperNodes.

Everything listens on 127.0.0.1 only, on free ports. One call does what three sites and
one server operator would do by hand (see ``docs/deployment.md``):

1. generate a throwaway CA and a server certificate for ``127.0.0.1``/``localhost``
   (``cryptography``), and one EC P-384 key pair per SuperNode (OpenSSH format, which is
   what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
   read);
2. start ``flower-superlink`` with TLS and ``--enable-supernode-auth``;
3. write a SuperLink connection with the CA as ``root-certificates`` into
   ``$FLWR_HOME/config.toml`` (``FLWR_HOME`` lives in the work directory) and register
   every SuperNode public key with ``flwr supernode register``;
4. start N ``flower-supernode`` processes, each with ``--node-config
   'partition-id=i num-partitions=N'`` and its private key;
5. ``flwr run <copy of app> <connection> --run-config ... --stream`` and collect the
   run status and the result: the sgs-flower app's ``results-file`` JSON and final model
   (``<stem>.npz``) and its privacy ``ledger`` (absolute paths in the work directory;
   one ledger per deployment, so a second run resumes the spent epsilon);
6. stop every process it started, also on exceptions, ``KeyboardInterrupt``, SIGTERM and
   at interpreter exit.

Every process it starts carries a marker in its environment (``SGS_DEPLOY_ID``); on stop
the module kills the process trees it started *and* every process whose environment
carries the marker, because SuperLink and SuperNode launch their helpers
(``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) in new sessions, outside
our process groups.

Usable as a module::

    from scripts.deploy_local import LocalDeployment
    with LocalDeployment(3, workdir) as dep:          # start() is called by __enter__
        res = dep.run(".", {"preset": "secagg", "num-server-rounds": 2})
        dep.kill_supernode(2)

and as a script::

    python scripts/deploy_local.py --app . --supernodes 3 --workdir /tmp/dep \
        --run-config 'preset="distributed-dp" num-server-rounds=2 min-survivors=3'

Written against flwr 1.41 (single HTTP API per process on ``--host/--port``). Flags
are chosen from the installed ``--help`` output, so releases that still have the older
gRPC flags (``--fleet-api-address``, ``--clientappio-api-address``) are handled as well.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as _dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
MARKER_ENV = "SGS_DEPLOY_ID"
CONNECTION_NAME = "sgs-local"
# Run-config keys that `LocalDeployment.run` fills in when the app declares them:
OUTPUT_DIR_KEY = "output-dir"  # the ServerApp writes result.json here (tiny test app)
LEDGER_PATH_KEY = "ledger-path"  # privacy ledger, shared by all runs of one deployment
# ... and the keys of the sgs-flower app itself (sgs_flower/app/settings.py):
RESULTS_FILE_KEY = "results-file"  # absolute path of the results JSON (+ `<stem>.npz` model)
LEDGER_KEY = "ledger"  # absolute path of the privacy ledger (DP modes central/distributed)
DP_MODE_KEY = "dp-mode"
PRESET_KEY = "preset"
LEDGER_DP_MODES = {"central", "distributed"}  # the modes that write a ledger

# File types Flower puts into a FAB (flwr/common/constant.py FAB_INCLUDE_PATTERNS) plus
# the files the build needs; everything else is not copied when staging the app.
_APP_SUFFIXES = {".py", ".toml", ".md", ".yaml", ".yml", ".json", ".jsonl"}
_APP_EXTRA_FILES = {"LICENSE", ".gitignore"}
_APP_SKIP_DIRS = {
    ".venv",
    "venv",
    "env",
    ".git",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "build",
    "dist",
    "node_modules",
    ".flwr",
    ".flwr-home",
    "outputs",
    "tests",
}


class DeploymentError(RuntimeError):
    """A step of the local deployment failed (message includes the relevant log tail)."""


# ----------------------------------------------------------------------------- helpers
def free_port(host: str = HOST) -> int:
    """Return a currently free TCP port on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "<no log>"
    return "\n".join(lines[-n:])


def _help_text(exe: str) -> str:
    try:
        out = subprocess.run(
            [exe, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout + out.stderr


def _bin(name: str) -> str:
    """Executable next to the running interpreter (the venv), else from PATH."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise DeploymentError(f"executable {name!r} not found")
    return found


# ----------------------------------------------------------------------------- certificates
@dataclass(frozen=True)
class Certificates:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def generate_certificates(
    directory: Path, hosts: Sequence[str] = (HOST, "localhost")
) -> Certificates:
    """Throwaway CA + server certificate (EC P-256, 2 days) valid for ``hosts``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sgs-flower throwaway CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    srv_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def _write(path: Path, data: bytes, private: bool = False) -> Path:
        path.write_bytes(data)
        if private:
            path.chmod(0o600)
        return path

    pem = serialization.Encoding.PEM
    nopw = serialization.NoEncryption()
    return Certificates(
        ca_cert=_write(directory / "ca.crt", ca_cert.public_bytes(pem)),
        ca_key=_write(
            directory / "ca.key",
            ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopw),
            private=True,
        ),
        server_cert=_write(directory / "server.pem", srv_cert.public_bytes(pem)),
        server_key=_write(
            directory / "server.key",
            srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopw),
            private=True,
        ),
    )


def generate_supernode_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """EC P-384 key pair in OpenSSH format: (private key, public key ``.pub``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = directory / name
    pub = directory / f"{name}.pub"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    priv.chmod(0o600)
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return priv, pub


# ----------------------------------------------------------------------------- processes
def _proc_table() -> dict[int, int]:
    """pid -> ppid for every process visible in /proc."""
    table: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            # comm may contain spaces/parens: split after the last ')'
            rest = stat[stat.rindex(")") + 2 :].split()
            if rest[0] == "Z":  # zombie: already dead
                continue
            table[int(entry)] = int(rest[1])
        except (OSError, ValueError, IndexError):
            continue
    return table


def descendants(pid: int, table: Mapping[int, int] | None = None) -> set[int]:
    """All live descendants of ``pid`` (not including ``pid``)."""
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for p, pp in table.items():
        children.setdefault(pp, []).append(p)
    out: set[int] = set()
    stack = [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def pids_with_marker(marker: str) -> set[int]:
    """Live processes whose environment contains ``SGS_DEPLOY_ID=<marker>``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    me = os.getpid()
    found: set[int] = set()
    for pid in _proc_table():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.add(pid)
    return found


def pid_alive(pid: int) -> bool:
    return pid in _proc_table()


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_tree(roots: Iterable[int], marker: str | None, timeout: float = 5.0) -> set[int]:
    """SIGTERM, then SIGKILL, ``roots``, their descendants and ``marker`` processes.

    Returns the pids that were signalled. Descendants are collected *before* signalling
    so that children re-parented to init on their parent's death are not missed.
    """
    roots = [p for p in roots if p > 0]
    table = _proc_table()
    targets: set[int] = set()
    for r in roots:
        if r in table:
            targets.add(r)
        targets |= descendants(r, table)
    if marker:
        targets |= pids_with_marker(marker)
    targets.discard(os.getpid())
    if not targets:
        return targets
    _signal_all(targets, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = set(_proc_table())
        # new helpers may have been spawned meanwhile: include them
        extra = pids_with_marker(marker) - targets if marker else set()
        if extra:
            _signal_all(extra, signal.SIGTERM)
            targets |= extra
        if not (targets & live):
            break
        time.sleep(0.1)
    for _ in range(3):
        live = set(_proc_table())
        left = targets & live
        if marker:
            left |= pids_with_marker(marker)
        if not left:
            break
        _signal_all(left, signal.SIGKILL)
        targets |= left
        time.sleep(0.2)
    return targets


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    cmd: list[str]
    _logf: Any = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> set[int]:
        return {self.pid} | descendants(self.pid) if self.alive() else descendants(self.pid)


@dataclass
class RunResult:
    """Outcome of :meth:`LocalDeployment.run`."""

    run_id: int | None
    status: str | None  # e.g. "finished:completed", "finished:failed"
    returncode: int  # of `flwr run`
    duration_s: float
    stdout: str
    output_dir: Path | None  # the app's `output-dir` (if it declares that key)
    result: dict[str, Any] | None  # output_dir/result.json if present
    run_info: dict[str, Any] | None  # the `flwr ls --run-id` JSON entry
    ledger_path: Path | None = None  # the app's `ledger` / `ledger-path` (if it declares one)
    results_file: Path | None = None  # the app's `results-file` (if it declares that key)
    run_config: dict[str, Any] = field(default_factory=dict)  # what was passed to `flwr run`

    @property
    def ok(self) -> bool:
        return bool(self.status) and "completed" in str(self.status)

    @property
    def model_file(self) -> Path | None:
        """The final global model the sgs-flower ServerApp saves beside ``results-file``."""
        if self.results_file is None:
            return None
        path = self.results_file.with_suffix(".npz")
        return path if path.exists() else None


# ----------------------------------------------------------------------------- deployment
_LIVE: weakref.WeakSet[LocalDeployment] = weakref.WeakSet()


def _stop_all_at_exit() -> None:
    for dep in list(_LIVE):
        with contextlib.suppress(Exception):
            dep.stop()


atexit.register(_stop_all_at_exit)


class LocalDeployment:
    """SuperLink + N SuperNodes on 127.0.0.1 with TLS and SuperNode authentication.

    Parameters
    ----------
    n_supernodes : int
        SuperNodes to start; node ``i`` gets ``--node-config 'partition-id=i
        num-partitions=n_supernodes'`` (plus ``node_config_extra``).
    workdir : Path
        Everything goes here: ``certs/``, ``keys/``, ``flwr_home/`` (``FLWR_HOME``),
        ``logs/``, ``apps/`` (staged app copies), ``runs/<k>/`` (outputs), ``state.db``.
    tls, supernode_auth : bool
        Turn TLS / SuperNode authentication off for debugging (both on by default).
    database : bool
        Persist SuperLink state in ``workdir/state.db`` (default) instead of in memory.
    startup_timeout : float
        Seconds to wait for the SuperLink health endpoint and for SuperNodes to connect.
    node_config_extra : mapping
        Extra ``key=value`` pairs for every SuperNode's ``--node-config``.
    env : mapping
        Extra environment variables for every process started.
    """

    def __init__(
        self,
        n_supernodes: int,
        workdir: str | os.PathLike[str],
        *,
        tls: bool = True,
        supernode_auth: bool = True,
        database: bool = True,
        startup_timeout: float = 60.0,
        node_config_extra: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if n_supernodes < 1:
            raise ValueError("n_supernodes must be >= 1")
        self.n_supernodes = n_supernodes
        self.workdir = Path(workdir).expanduser().resolve()
        self.tls = tls
        self.supernode_auth = supernode_auth
        self.database = database
        self.startup_timeout = startup_timeout
        self.node_config_extra = dict(node_config_extra or {})
        self.marker = uuid.uuid4().hex
        self.flwr_home = self.workdir / "flwr_home"
        self.log_dir = self.workdir / "logs"
        self.key_dir = self.workdir / "keys"
        self.port = 0
        self.certs: Certificates | None = None
        self.superlink: ManagedProcess | None = None
        self.supernodes: dict[int, ManagedProcess] = {}
        self.supernode_keys: dict[int, tuple[Path, Path]] = {}
        self.node_ids: dict[int, int] = {}  # index -> node id from `register`
        self._all_procs: list[ManagedProcess] = []
        self._env_extra = dict(env or {})
        self._runs = 0
        self._started = False
        self._stopped = False
        self._superlink_help = ""
        self._supernode_help = ""

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ environment
    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self._env_extra)
        env["FLWR_HOME"] = str(self.flwr_home)
        env[MARKER_ENV] = self.marker
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("COLUMNS", "200")
        # make sure the venv's flwr executables are found by helpers Flower spawns
        venv_bin = str(Path(sys.executable).parent)
        if venv_bin not in env.get("PATH", "").split(os.pathsep):
            env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
        return env

    def _spawn(self, name: str, cmd: list[str]) -> ManagedProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        logf = open(log, "ab")  # noqa: SIM115 - closed in stop()
        logf.write(f"\n$ {' '.join(cmd)}\n".encode())
        logf.flush()
        popen = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env(),
            cwd=str(self.workdir),
            start_new_session=True,  # own process group: killpg reaches the whole group
        )
        proc = ManagedProcess(name=name, popen=popen, log=log, cmd=cmd, _logf=logf)
        self._all_procs.append(proc)
        return proc

    def flwr(
        self, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI with this deployment's ``FLWR_HOME``."""
        cmd = [_bin("flwr"), *args]
        res = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=str(self.workdir),
            timeout=timeout,
        )
        with open(self.log_dir / "flwr-cli.log", "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n[rc={res.returncode}]\n{res.stdout}\n{res.stderr}\n")
        if check and res.returncode != 0:
            raise DeploymentError(
                f"`flwr {' '.join(args)}` failed (rc={res.returncode}):\n{res.stdout}\n{res.stderr}"
            )
        return res

    # ------------------------------------------------------------------ start
    def start(self) -> LocalDeployment:
        """Generate certificates and keys, start SuperLink, register keys, start SuperNodes."""
        if self._started:
            return self
        self._started = True
        _LIVE.add(self)
        for d in (self.workdir, self.flwr_home, self.log_dir, self.key_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.certs = generate_certificates(self.workdir / "certs")
        self._superlink_help = _help_text(_bin("flower-superlink"))
        self._supernode_help = _help_text(_bin("flower-supernode"))
        self.start_superlink()
        self.write_connection()
        for i in range(self.n_supernodes):
            self.supernode_keys[i] = generate_supernode_keys(self.key_dir, f"supernode-{i}")
        if self.supernode_auth:  # `flwr supernode register` costs ~2.5 s each: run them in parallel
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(8, self.n_supernodes)) as pool:
                ids = pool.map(
                    lambda i: self.register_key(self.supernode_keys[i][1], name=f"site-{i}"),
                    range(self.n_supernodes),
                )
                self.node_ids = dict(zip(range(self.n_supernodes), ids, strict=True))
        for i in range(self.n_supernodes):
            self.start_supernode(i)
        self.wait_for_nodes(self.n_supernodes)
        return self

    def start_superlink(self) -> ManagedProcess:
        self.port = free_port()
        h = self._superlink_help
        cmd = [_bin("flower-superlink")]
        if "--host" in h and "--port" in h:  # >= 1.41: one HTTP API for Fleet/Control/Runtime
            cmd += ["--host", HOST, "--port", str(self.port)]
        else:  # older gRPC releases: three APIs on three ports
            cmd += [
                "--fleet-api-address",
                f"{HOST}:{self.port}",
                "--control-api-address",
                f"{HOST}:{free_port()}",
                "--serverappio-api-address",
                f"{HOST}:{free_port()}",
            ]
        if self.tls:
            assert self.certs is not None
            cmd += [
                "--ssl-ca-certfile",
                str(self.certs.ca_cert),
                "--ssl-certfile",
                str(self.certs.server_cert),
                "--ssl-keyfile",
                str(self.certs.server_key),
            ]
        else:
            cmd += ["--insecure"]
        if self.supernode_auth:
            cmd += ["--enable-supernode-auth"]
        cmd += ["--isolation", "subprocess"]
        if self.database:
            cmd += ["--database", str(self.workdir / "state.db")]
        if "--disable-runtime-dependency-installation" in h:
            cmd += ["--disable-runtime-dependency-installation"]
        self.superlink = self._spawn("superlink", cmd)
        self._wait_superlink_healthy()
        return self.superlink

    def _wait_superlink_healthy(self) -> None:
        import httpx

        assert self.superlink is not None
        scheme = "https" if self.tls else "http"
        verify: Any = False
        if self.tls and self.certs:
            import ssl

            verify = ssl.create_default_context(cafile=str(self.certs.ca_cert))
        deadline = time.monotonic() + self.startup_timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.superlink.alive():
                raise DeploymentError(
                    f"flower-superlink exited with {self.superlink.popen.returncode}:\n"
                    + _tail(self.superlink.log)
                )
            try:
                r = httpx.get(f"{scheme}://{self.address}/health", verify=verify, timeout=2.0)
                if r.is_success:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.3)
        raise DeploymentError(
            f"SuperLink not healthy after {self.startup_timeout}s ({last}):\n"
            + _tail(self.superlink.log)
        )

    def write_connection(self) -> Path:
        """``$FLWR_HOME/config.toml`` with a TLS connection named ``sgs-local`` (default)."""
        lines = [
            "[superlink]",
            f'default = "{CONNECTION_NAME}"',
            "",
            f"[superlink.{CONNECTION_NAME}]",
            f'address = "{self.address}"',
        ]
        if self.tls:
            assert self.certs is not None
            lines.append(f'root-certificates = "{self.certs.ca_cert}"')
        else:
            lines.append("insecure = true")
        path = self.flwr_home / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def register_key(self, public_key: Path, name: str | None = None) -> int:
        """``flwr supernode register <pub> sgs-local`` -> node id."""
        args = ["supernode", "register", str(public_key), CONNECTION_NAME, "--format", "json"]
        if name:
            args += ["--name", name]
        res = self.flwr(*args)
        try:
            payload = json.loads(res.stdout[res.stdout.index("{") :])
            return int(payload["node-id"])
        except (ValueError, KeyError) as e:
            raise DeploymentError(f"cannot parse register output: {res.stdout!r}") from e

    def start_supernode(
        self,
        i: int,
        *,
        private_key: Path | None = None,
        node_config: Mapping[str, Any] | None = None,
        name: str | None = None,
        max_retries: int | None = None,
        without_key: bool = False,
    ) -> ManagedProcess:
        """Start SuperNode ``i`` (key ``keys/supernode-i`` unless ``private_key`` given).

        ``name`` starts an extra process that is not tracked as SuperNode ``i`` (used for
        intruders); ``without_key`` omits ``--auth-supernode-private-key``.
        """
        h = self._supernode_help
        cfg: dict[str, Any] = {"partition-id": i, "num-partitions": self.n_supernodes}
        cfg.update(self.node_config_extra)
        cfg.update(node_config or {})
        cmd = [_bin("flower-supernode"), "--superlink", self.address]
        if self.tls:
            assert self.certs is not None
            cmd += ["--root-certificates", str(self.certs.ca_cert)]
        else:
            cmd += ["--insecure"]
        if (self.supernode_auth or private_key is not None) and not without_key:
            key = private_key or self.supernode_keys[i][0]
            cmd += ["--auth-supernode-private-key", str(key)]
        cmd += ["--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in cfg.items())]
        if "--clientappio-api-address" in h:  # older releases
            cmd += ["--clientappio-api-address", f"{HOST}:{free_port()}"]
        elif "--port" in h:
            cmd += ["--host", HOST, "--port", str(free_port())]
        cmd += ["--isolation", "subprocess"]
        if max_retries is not None and "--max-retries" in h:
            cmd += ["--max-retries", str(max_retries)]
        proc = self._spawn(name or f"supernode-{i}", cmd)
        if name is None:
            self.supernodes[i] = proc
        return proc

    def add_supernode(self, node_config: Mapping[str, Any] | None = None) -> int:
        """Generate and register a key for one more SuperNode, start it; its index.

        The new node ``i`` gets ``partition-id=i num-partitions=n_supernodes`` unless
        ``node_config`` says otherwise (the first nodes keep their ``num-partitions``).
        Call :meth:`wait_for_nodes` before relying on it being online.
        """
        i = max(self.supernodes, default=-1) + 1
        self.supernode_keys[i] = generate_supernode_keys(self.key_dir, f"supernode-{i}")
        if self.supernode_auth:
            self.node_ids[i] = self.register_key(self.supernode_keys[i][1], name=f"site-{i}")
        self.start_supernode(i, node_config=node_config)
        return i

    def list_nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list sgs-local --format json`` (SuperNode rows)."""
        res = self.flwr("supernode", "list", CONNECTION_NAME, "--format", "json", check=False)
        try:
            payload = json.loads(res.stdout[res.stdout.index("{") :])
        except ValueError:
            return []
        nodes = payload.get("nodes", payload.get("supernodes", []))
        return list(nodes) if isinstance(nodes, list) else []

    def online_node_ids(self) -> set[int]:
        out = set()
        for row in self.list_nodes():
            status = str(row.get("status", "")).lower()
            if status == "online":
                out.add(int(row.get("node-id", row.get("node_id", 0))))
        return out

    def wait_for_nodes(self, n: int, timeout: float | None = None) -> None:
        """Wait until ``n`` SuperNodes are online (fails early if one of ours died)."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while time.monotonic() < deadline:
            for i, p in self.supernodes.items():
                if not p.alive():
                    raise DeploymentError(
                        f"supernode-{i} exited with {p.popen.returncode}:\n" + _tail(p.log)
                    )
            if len(self.online_node_ids()) >= n:
                return
            time.sleep(1.0)
        raise DeploymentError(
            f"only {len(self.online_node_ids())}/{n} SuperNodes online after timeout; "
            f"see {self.log_dir}"
        )

    # ------------------------------------------------------------------ run
    def stage_app(self, app_dir: str | os.PathLike[str]) -> Path:
        """Copy the app's FAB-relevant files to ``workdir/apps/<k>``.

        ``flwr run`` migrates a legacy ``[tool.flwr.federations]`` section by rewriting
        the app's pyproject.toml; running on a copy keeps the source tree untouched.
        """
        src = Path(app_dir).expanduser().resolve()
        if not (src / "pyproject.toml").exists():
            raise DeploymentError(f"{src} has no pyproject.toml")
        dst = self.workdir / "apps" / f"app-{self._runs}"
        if dst.exists():
            shutil.rmtree(dst)
        skip = {self.workdir}
        for root, dirs, files in os.walk(src):
            rootp = Path(root)
            dirs[:] = [
                d
                for d in dirs
                if d not in _APP_SKIP_DIRS
                and not d.endswith(".egg-info")
                and (rootp / d).resolve() not in skip
            ]
            for f in files:
                if Path(f).suffix in _APP_SUFFIXES or f in _APP_EXTRA_FILES:
                    target = dst / rootp.relative_to(src) / f
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(rootp / f, target)
        return dst

    def run(
        self,
        app_dir: str | os.PathLike[str],
        run_config: Mapping[str, Any] | None = None,
        *,
        timeout: float = 600.0,
        stream: bool = True,
    ) -> RunResult:
        """``flwr run`` the app against this deployment and wait for the run to end.

        Keys filled in when the app's ``[tool.flwr.app.config]`` declares them and
        ``run_config`` does not set them:

        * ``output-dir`` -> ``workdir/runs/run-<k>``; its ``result.json`` is
          ``RunResult.result`` (the tiny test app);
        * ``results-file`` -> ``workdir/runs/run-<k>/results.json``; that JSON is
          ``RunResult.result`` and ``<stem>.npz`` ``RunResult.model_file`` (sgs-flower);
        * ``ledger`` -> ``workdir/ledger.jsonl`` when the effective ``dp-mode`` (run
          config, else the ``preset`` file in ``configs/``, else the default) writes a
          ledger; a relative ``ledger`` is made absolute against ``workdir`` (the
          ServerApp's working directory). One ledger per deployment: the next run
          resumes the spent epsilon;
        * ``ledger-path`` -> ``workdir/ledger.jsonl``.
        """
        if not self._started or self._stopped:
            raise DeploymentError("deployment not running")
        self._runs += 1
        staged = self.stage_app(app_dir)
        app_cfg = _app_config(staged)
        cfg = dict(run_config or {})
        out_dir: Path | None = None
        if OUTPUT_DIR_KEY in app_cfg:
            out_dir = Path(cfg.get(OUTPUT_DIR_KEY) or self.workdir / "runs" / f"run-{self._runs}")
            out_dir.mkdir(parents=True, exist_ok=True)
            cfg[OUTPUT_DIR_KEY] = str(out_dir)
        results_file: Path | None = None
        if RESULTS_FILE_KEY in app_cfg:
            results_file = Path(
                cfg.get(RESULTS_FILE_KEY)
                or self.workdir / "runs" / f"run-{self._runs}" / "results.json"
            )
            if not results_file.is_absolute():
                results_file = self.workdir / results_file
            results_file.parent.mkdir(parents=True, exist_ok=True)
            results_file.unlink(missing_ok=True)
            results_file.with_suffix(".npz").unlink(missing_ok=True)
            cfg[RESULTS_FILE_KEY] = str(results_file)
        ledger: Path | None = None
        if LEDGER_PATH_KEY in app_cfg:
            # one ledger per deployment: a second run resumes the spent budget
            ledger = Path(cfg.get(LEDGER_PATH_KEY) or self.workdir / "ledger.jsonl")
            cfg[LEDGER_PATH_KEY] = str(ledger)
        if LEDGER_KEY in app_cfg:
            given = cfg.get(LEDGER_KEY) or _effective_value(staged, app_cfg, cfg, LEDGER_KEY)
            if _effective_value(staged, app_cfg, cfg, DP_MODE_KEY) in LEDGER_DP_MODES:
                ledger = Path(given or self.workdir / "ledger.jsonl")
                if not ledger.is_absolute():
                    ledger = self.workdir / ledger
                cfg[LEDGER_KEY] = str(ledger)
            elif cfg.get(LEDGER_KEY):
                ledger = Path(cfg[LEDGER_KEY])
        unknown = sorted(set(cfg) - set(app_cfg))
        if unknown:
            raise DeploymentError(f"run_config keys not in [tool.flwr.app.config]: {unknown}")
        args = ["run", str(staged), CONNECTION_NAME]
        if cfg:
            args += ["--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in cfg.items())]
        if stream:
            args += ["--stream"]
        t0 = time.monotonic()
        log_path = self.log_dir / f"flwr-run-{self._runs}.log"
        try:
            res = self.flwr(*args, timeout=timeout, check=False)
            rc, stdout = res.returncode, res.stdout + res.stderr
        except subprocess.TimeoutExpired as e:
            rc = 124
            stdout = (
                (e.stdout or b"").decode(errors="replace")
                if isinstance(e.stdout, bytes)
                else (e.stdout or "")
            )
        log_path.write_text(stdout)
        run_id = _parse_run_id(stdout)
        info = self.run_info(run_id) if run_id is not None else None
        if run_id is not None and not stream:
            info = self.wait_run(run_id, timeout=max(1.0, timeout - (time.monotonic() - t0)))
        status = _status_of(info)
        result = None
        if out_dir is not None and (out_dir / "result.json").exists():
            result = json.loads((out_dir / "result.json").read_text())
        if results_file is not None and results_file.exists():
            result = json.loads(results_file.read_text())
        return RunResult(
            run_id=run_id,
            status=status,
            returncode=rc,
            duration_s=time.monotonic() - t0,
            stdout=stdout,
            output_dir=out_dir,
            result=result,
            run_info=info,
            ledger_path=ledger,
            results_file=results_file,
            run_config=cfg,
        )

    def run_info(self, run_id: int) -> dict[str, Any] | None:
        res = self.flwr(
            "ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json", check=False
        )
        try:
            payload = json.loads(res.stdout[res.stdout.index("{") :])
        except ValueError:
            return None
        runs = payload.get("runs", [])
        for r in runs:
            if str(r.get("run-id")) == str(run_id):
                return dict(r)
        return None

    def wait_run(self, run_id: int, timeout: float = 600.0) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        info = None
        while time.monotonic() < deadline:
            info = self.run_info(run_id)
            if info and str(_status_of(info)).startswith("finished"):
                return info
            time.sleep(2.0)
        return info

    def stop_run(self, run_id: int) -> None:
        self.flwr("stop", str(run_id), CONNECTION_NAME, check=False)

    # ------------------------------------------------------------------ failures
    def kill_supernode(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Kill SuperNode ``i`` and its ClientApp helpers (default SIGKILL: a crash)."""
        proc = self.supernodes[i]
        pids = proc.tree()
        _signal_all(pids, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=10)
        if sig != signal.SIGKILL:
            kill_tree(pids, None, timeout=5)

    # ------------------------------------------------------------------ stop
    def all_pids(self) -> set[int]:
        """Every live process this deployment started (trees + marker)."""
        table = _proc_table()
        pids: set[int] = set()
        for p in self._all_procs:
            if p.pid in table:
                pids.add(p.pid)
            pids |= descendants(p.pid, table)
        return pids | pids_with_marker(self.marker)

    def stop(self) -> None:
        """Stop everything (idempotent). SuperNodes first, then the SuperLink, then strays."""
        if self._stopped:
            return
        self._stopped = True
        try:
            order = [p for p in self._all_procs if p is not self.superlink]
            if self.superlink is not None:
                order.append(self.superlink)
            for p in order:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGTERM)
            kill_tree([p.pid for p in order], self.marker, timeout=5.0)
            for p in order:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(timeout=5)
        finally:
            for p in self._all_procs:
                with contextlib.suppress(Exception):
                    p._logf.close()
            _LIVE.discard(self)


def verify_ledger(path: str | os.PathLike[str]) -> tuple[bool, str]:
    """``sgs-flower ledger verify`` in-process: (ok, summary)."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from sgs_flower.ledger import verify

    res = verify(Path(path))
    return bool(res.ok), str(res.summary())


# ----------------------------------------------------------------------------- small parsers
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string is JSON-compatible for our values


def _app_config(app_dir: Path) -> dict[str, Any]:
    with open(app_dir / "pyproject.toml", "rb") as f:
        data = tomllib.load(f)
    cfg = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    flat: dict[str, Any] = {}

    def _flatten(prefix: str, d: Mapping[str, Any]) -> None:
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, Mapping):
                _flatten(key, v)
            else:
                flat[key] = v

    _flatten("", cfg)
    return flat


def _effective_value(
    app_dir: Path, app_cfg: Mapping[str, Any], cfg: Mapping[str, Any], key: str
) -> Any:
    """What the sgs-flower app will use for ``key``: the run config if it differs from
    the default, else the preset (``configs/<preset>.toml``), else the default (this
    mirrors ``sgs_flower.app.settings.resolve``)."""
    default = app_cfg.get(key)
    if key in cfg and cfg[key] != default:
        return cfg[key]
    preset = cfg.get(PRESET_KEY, app_cfg.get(PRESET_KEY))
    if preset:
        path = app_dir / "configs" / f"{preset}.toml"
        if path.is_file():
            with path.open("rb") as f:
                values = tomllib.load(f)
            if key in values:
                return values[key]
    return default


def _parse_run_id(text: str) -> int | None:
    import re

    m = re.search(r"Successfully started run (\d+)", text)
    if m:
        return int(m.group(1))
    m = re.search(r'"run-id"\s*:\s*"?(\d+)', text)
    return int(m.group(1)) if m else None


def _status_of(info: Mapping[str, Any] | None) -> str | None:
    if not info:
        return None
    return str(info.get("status")) if info.get("status") is not None else None


# ----------------------------------------------------------------------------- CLI
def _parse_kv(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        for part in item.split():
            k, _, v = part.partition("=")
            try:
                out[k] = tomllib.loads(f"v = {v}")["v"]
            except tomllib.TOMLDecodeError:
                out[k] = v
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--app", default=".", help="Flower app directory (default: .)")
    ap.add_argument("--supernodes", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="default: a new /tmp/sgs-deploy-* dir")
    ap.add_argument(
        "--run-config", action="append", default=[], help="k=v pairs (TOML values), may repeat"
    )
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--insecure", action="store_true", help="no TLS (debugging only)")
    ap.add_argument("--no-auth", action="store_true", help="no SuperNode auth (debugging only)")
    ap.add_argument(
        "--keep-running",
        action="store_true",
        help="after the run, keep the deployment up until Ctrl-C",
    )
    args = ap.parse_args(argv)

    import tempfile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sgs-deploy-"))

    def _sigterm(_sig: int, _frm: Any) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGHUP, _sigterm)
    t0 = time.monotonic()
    with LocalDeployment(
        args.supernodes, workdir, tls=not args.insecure, supernode_auth=not args.no_auth
    ) as dep:
        print(
            f"SuperLink {dep.address} (TLS={dep.tls}, auth={dep.supernode_auth}), "
            f"{args.supernodes} SuperNodes online after {time.monotonic() - t0:.1f}s; "
            f"workdir {workdir}",
            flush=True,
        )
        res = dep.run(args.app, _parse_kv(args.run_config), timeout=args.timeout)
        print(
            f"run {res.run_id}: status={res.status} rc={res.returncode} "
            f"in {res.duration_s:.1f}s; logs in {dep.log_dir}",
            flush=True,
        )
        if res.result is not None:
            print(json.dumps(res.result, indent=2))
        ledger_ok: bool | None = None
        if res.ledger_path is not None and res.ledger_path.exists():
            ledger_ok, msg = verify_ledger(res.ledger_path)
            print(f"ledger {res.ledger_path}: {msg}", flush=True)
        summary = {
            "run_id": res.run_id,
            "status": res.status,
            "returncode": res.returncode,
            "duration_s": round(res.duration_s, 2),
            "output_dir": str(res.output_dir) if res.output_dir else None,
            "results_file": str(res.results_file) if res.results_file else None,
            "model_file": str(res.model_file) if res.model_file else None,
            "ledger": str(res.ledger_path) if res.ledger_path else None,
            "ledger_ok": ledger_ok,
            "workdir": str(workdir),
        }
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        if args.keep_running:
            print("deployment up; Ctrl-C to stop", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1)
    print(f"all processes stopped ({time.monotonic() - t0:.1f}s total)")
    return 0 if res.ok and ledger_ok is not False else 1


if __name__ == "__main__":
    sys.exit(main())
