"""``LocalDeployment``: a SuperLink and N SuperNodes on 127.0.0.1, TLS and SuperNode auth.

One object does what a server operator and N sites would do by hand (see
``docs/deployment.md``): certificates, SuperNode keys and their registration, the
processes, a ``flwr`` connection in a private ``FLWR_HOME``, ``flwr run`` of an app and
the cleanup of every process it started (also on exceptions, SIGTERM and at exit).

Per-site material: every SuperNode ``i`` has a directory ``workdir/sites/site-i`` and
the ``node_setup`` hook is called with it before the node starts; what the hook returns
is added to that node's ``--node-config``. That is where a site's own files (for
example an identity key the site pins) and the node-config entries pointing to them go.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgs_flower.deploy.base import HOST, MARKER_ENV, DeploymentError, free_port, tail
from sgs_flower.deploy.certs import Certificates, generate_certificates, generate_supernode_keys
from sgs_flower.deploy.flower import (
    FlowerFlags,
    flower_bin,
    superlink_command,
    supernode_command,
)
from sgs_flower.deploy.processes import (
    ManagedProcess,
    descendants,
    kill_tree,
    pids_with_marker,
    proc_table,
    signal_all,
)
from sgs_flower.deploy.runs import (
    RunResult,
    config_string,
    parse_run_id,
    prepare_run,
    read_result,
    stage_app,
    status_of,
)

CONNECTION_NAME = "sgs-local"


@dataclass(frozen=True)
class NodeSite:
    """What the ``node_setup`` hook gets for SuperNode ``index``.

    ``directory`` (``workdir/sites/site-<index>``, created) is the site's own folder;
    ``private_key``/``public_key`` are its SuperNode authentication key pair.
    """

    index: int
    directory: Path
    private_key: Path
    public_key: Path


# Called once per SuperNode before it starts; returns extra --node-config entries.
NodeSetup = Callable[[NodeSite], Mapping[str, Any]]


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
        num-partitions=n_supernodes'`` plus ``node_config_extra`` plus what
        ``node_setup`` returns for it.
    workdir : Path
        Everything goes here: ``certs/``, ``keys/``, ``sites/site-<i>/`` (per-node files),
        ``flwr_home/`` (``FLWR_HOME``), ``logs/``, ``apps/`` (staged app copies),
        ``runs/<k>/`` (outputs), ``state.db``.
    tls, supernode_auth : bool
        Turn TLS / SuperNode authentication off for debugging (both on by default).
    database : bool
        Persist SuperLink state in ``workdir/state.db`` (default) instead of in memory.
    startup_timeout : float
        Seconds to wait for the SuperLink health endpoint and for SuperNodes to connect.
    node_config_extra : mapping
        Extra ``key=value`` pairs for every SuperNode's ``--node-config``.
    node_setup : callable
        ``node_setup(NodeSite) -> mapping``, called once per SuperNode (also for
        :meth:`add_supernode`) after its key pair exists and before it starts: write the
        site's own files into ``site.directory`` and return the ``--node-config``
        entries that point to them. Stored in :attr:`node_config_by_node`.
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
        node_setup: NodeSetup | None = None,
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
        self.node_setup = node_setup
        # index -> the node's own --node-config entries (from node_setup)
        self.node_config_by_node: dict[int, dict[str, Any]] = {}
        self.marker = uuid.uuid4().hex
        self.flwr_home = self.workdir / "flwr_home"
        self.log_dir = self.workdir / "logs"
        self.key_dir = self.workdir / "keys"
        self.site_dir = self.workdir / "sites"
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
        self._flags = FlowerFlags("", "")

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
        cmd = [flower_bin("flwr"), *args]
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
        self._flags = FlowerFlags.detect()
        self.start_superlink()
        self.write_connection()
        for i in range(self.n_supernodes):
            self.prepare_site(i)
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

    def prepare_site(self, i: int) -> NodeSite:
        """SuperNode ``i``'s key pair and site directory; runs ``node_setup`` for it."""
        priv, pub = generate_supernode_keys(self.key_dir, f"supernode-{i}")
        self.supernode_keys[i] = (priv, pub)
        site = NodeSite(i, self.site_dir / f"site-{i}", priv, pub)
        site.directory.mkdir(parents=True, exist_ok=True)
        if self.node_setup is not None:
            self.node_config_by_node[i] = dict(self.node_setup(site))
        return site

    def start_superlink(self) -> ManagedProcess:
        """Start ``flower-superlink`` on a free port and wait for its health endpoint."""
        self.port = free_port()
        cmd = superlink_command(
            self._flags,
            self.port,
            certs=self.certs if self.tls else None,
            supernode_auth=self.supernode_auth,
            database=self.workdir / "state.db" if self.database else None,
        )
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
                    + tail(self.superlink.log)
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
            + tail(self.superlink.log)
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
        cfg: dict[str, Any] = {"partition-id": i, "num-partitions": self.n_supernodes}
        cfg.update(self.node_config_extra)
        cfg.update(self.node_config_by_node.get(i, {}) if name is None else {})
        cfg.update(node_config or {})
        ca: Path | None = None
        if self.tls:
            assert self.certs is not None
            ca = self.certs.ca_cert
        key: Path | None = None
        if (self.supernode_auth or private_key is not None) and not without_key:
            key = private_key or self.supernode_keys[i][0]
        cmd = supernode_command(
            self._flags,
            self.address,
            root_certificates=ca,
            private_key=key,
            node_config=cfg,
            max_retries=max_retries,
        )
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
        self.prepare_site(i)
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
                        f"supernode-{i} exited with {p.popen.returncode}:\n" + tail(p.log)
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
        """Copy the app's FAB-relevant files to ``workdir/apps/app-<k>``.

        ``flwr run`` migrates a legacy ``[tool.flwr.federations]`` section by rewriting
        the app's pyproject.toml; running on a copy keeps the source tree untouched.
        """
        return stage_app(app_dir, self.workdir / "apps" / f"app-{self._runs}", {self.workdir})

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
        paths = prepare_run(staged, run_config, self.workdir, self._runs)
        cfg = paths.config
        args = ["run", str(staged), CONNECTION_NAME]
        if cfg:
            args += ["--run-config", config_string(cfg)]
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
        run_id = parse_run_id(stdout)
        info = self.run_info(run_id) if run_id is not None else None
        if run_id is not None and not stream:
            info = self.wait_run(run_id, timeout=max(1.0, timeout - (time.monotonic() - t0)))
        return RunResult(
            run_id=run_id,
            status=status_of(info),
            returncode=rc,
            duration_s=time.monotonic() - t0,
            stdout=stdout,
            output_dir=paths.output_dir,
            result=read_result(paths),
            run_info=info,
            ledger_path=paths.ledger,
            results_file=paths.results_file,
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
            if info and str(status_of(info)).startswith("finished"):
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
        signal_all(pids, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=10)
        if sig != signal.SIGKILL:
            kill_tree(pids, None, timeout=5)

    # ------------------------------------------------------------------ stop
    def all_pids(self) -> set[int]:
        """Every live process this deployment started (trees + marker)."""
        table = proc_table()
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
