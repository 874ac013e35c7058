"""A Postgres cluster and a Redis of a script's own, on spare loopback ports, which it may
stop and start at will: the machine's own servers, which tests and CI share, are never
touched. Used by the fault drill and the Kubernetes container check."""

import os
import shutil
import socket
import subprocess
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, check, timeout=30.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


class Postgres:
    """`initdb` and `pg_ctl` from the machine's PostgreSQL, in `work`/postgres. Local
    connections as `postgres` need no password; TCP ones need one when `host_auth` says so."""

    def __init__(self, work, host_auth="trust"):
        versions = sorted(os.listdir("/usr/lib/postgresql"), key=int)
        self.bin = f"/usr/lib/postgresql/{versions[-1]}/bin"
        self.data = os.path.join(work, "postgres")
        self.port = free_port()
        os.makedirs(self.data)
        if os.geteuid() == 0:
            shutil.chown(work, "postgres")
            shutil.chown(self.data, "postgres")
        auth = ["-A", "trust"] if host_auth == "trust" else ["--auth-local=trust", f"--auth-host={host_auth}"]
        self.run("initdb", "-D", self.data, *auth, "-U", "postgres", "--no-sync")

    def run(self, tool, *args):
        command = [os.path.join(self.bin, tool), *args]
        if os.geteuid() == 0:
            # initdb and pg_ctl refuse to run as root.
            command = ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in command)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self):
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.run("pg_ctl", "-D", self.data, "-l", os.path.join(self.data, "server.log"), "-o", options, "-w", "start")

    def stop(self):
        self.run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def sql(self, statement, database="postgres"):
        """Runs `statement` over the local socket as `postgres`; the rows, one per line."""
        output = subprocess.run(
            ["psql", "-h", self.data, "-p", str(self.port), "-U", "postgres", "-d", database, "-At", "-c", statement],
            check=True,
            capture_output=True,
            text=True,
        )
        return [line for line in output.stdout.splitlines() if line]


class Redis:
    """`redis-server` on a spare port, nothing kept on disk."""

    def __init__(self, work):
        self.port = free_port()
        self.log = os.path.join(work, "redis.log")
        self.process = None

    def start(self):
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with open(self.log, "ab") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=output)
        wait_until("redis", self.answers)

    def answers(self):
        ping = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True)
        return ping.stdout.strip() == b"PONG"

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait()


def tear_down(postgres, redis, work, keep=False):
    """Stops the Redis and Postgres of a run (Postgres may be stopped already) and removes
    its work directory unless `keep`."""
    redis.stop()
    try:
        postgres.stop()
    except subprocess.CalledProcessError:
        pass
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
