"""`make serve`: a local Prefect server (SQLite) on 127.0.0.1:4200 with train_many served on it.

Open http://127.0.0.1:4200, go to Deployments → train-many and press Run. Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def start_server(port: int, home: Path, log_path: Path) -> subprocess.Popen:
    """Start `prefect server start` on 127.0.0.1:`port` with its SQLite database under `home`."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    prefect = str(Path(sys.executable).with_name("prefect"))
    with open(log_path, "ab") as log:
        return subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def wait_healthy(api_url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    """Block until the API at `api_url` answers its health check; raise if the server died or timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {api_url} did not become healthy in {timeout:.0f} s")


def _stop_like_ctrl_c(signum, frame) -> None:
    """A terminated `make serve` must take its server down too, as Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--home", type=Path, default=Path(".prefect-local"), help="where the SQLite database lives")
    parser.add_argument("--nightly", action="store_true", help="activate the nightly retraining schedule")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    api_url = f"http://127.0.0.1:{args.port}/api"
    server = start_server(args.port, args.home, args.home / "server.log")
    try:
        wait_healthy(api_url, server)
        print(f"Prefect UI: http://127.0.0.1:{args.port}  (Deployments → train-many → Run)", flush=True)
        env = {**os.environ, "PREFECT_API_URL": api_url}
        serve_args = [sys.executable, "-m", "deployments.serve"] + (["--nightly"] if args.nightly else [])
        subprocess.run(serve_args, env=env, check=False)
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
