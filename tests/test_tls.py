"""Mutual TLS: a real `dask scheduler` and `dask worker` (subprocesses) on 127.0.0.1 with
certificates from a test CA. Clients without a certificate the CA signed are refused; a job
through the `address` profile with the client's certificate runs."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from geoseg.cli.main import cli
from geoseg.cluster import connect_profile
from geoseg.errors import ConfigError
from geoseg.jobs.profiles import AddressProfile, TLSFiles

DASK = str(Path(sys.executable).with_name("dask"))


def _name(cn: str):
    from cryptography.x509.oid import NameOID
    from cryptography import x509

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(folder: Path, cn: str):
    """A self-signed CA; returns (key, cert) and writes ``<cn>.pem``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (folder / f"{cn}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def make_cert(folder: Path, cn: str, ca_key, ca_cert) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by the CA, for servers and clients alike; (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{cn}.pem", folder / f"{cn}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """`dask scheduler` + one `dask worker` over mutual TLS on 127.0.0.1; both ended afterwards."""
    d = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert = make_ca(d, "ca")
    server = make_cert(d, "scheduler", ca_key, ca_cert)
    worker = make_cert(d, "worker", ca_key, ca_cert)
    client = make_cert(d, "client", ca_key, ca_cert)
    rogue_key, rogue_ca = make_ca(d, "rogue-ca")
    rogue = make_cert(d, "rogue", rogue_key, rogue_ca)
    ca = d / "ca.pem"
    scheduler_file = d / "scheduler.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs: list[subprocess.Popen] = []
    logs = []

    def spawn(name: str, *args: str) -> subprocess.Popen:
        log = open(d / f"{name}.log", "wb")
        logs.append(log)
        p = subprocess.Popen([DASK, *args], cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    try:
        spawn("scheduler", "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--tls-ca-file", str(ca), "--tls-cert", str(server[0]), "--tls-key", str(server[1]),
              "--scheduler-file", str(scheduler_file))
        deadline = time.monotonic() + 20
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            assert procs[0].poll() is None and time.monotonic() < deadline, (d / "scheduler.log").read_text()
            time.sleep(0.05)
        time.sleep(0.05)
        address = json.loads(scheduler_file.read_text())["address"]
        spawn("worker", "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1", "--no-nanny",
              "--host", "127.0.0.1", "--no-dashboard", "--local-directory", str(d / "w"),
              "--tls-ca-file", str(ca), "--tls-cert", str(worker[0]), "--tls-key", str(worker[1]))
        with connect_profile(profile({"address": address, "ca": ca}, client, timeout="20s")) as c:
            c.wait_for_workers(1, timeout=30)
        yield {"address": address, "ca": ca, "client": client, "rogue": rogue, "dir": d}
    finally:
        # Killed, not asked: a worker that ran torch takes seconds to exit, and nothing here needs a clean exit.
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        for log in logs:
            log.close()


def profile(cluster, cert_key: tuple[Path, Path], address: str | None = None, timeout: str = "2s") -> AddressProfile:
    cert, key = cert_key
    address = address or cluster["address"]
    tls = TLSFiles(ca_file=str(cluster["ca"]), cert_file=str(cert), key_file=str(key)) if address.startswith("tls") else None
    return AddressProfile(address=address, tls=tls, timeout=timeout)


def test_scheduler_listens_on_localhost_over_tls(tls_cluster):
    assert tls_cluster["address"].startswith("tls://127.0.0.1:")


def test_client_without_a_certificate_is_refused(tls_cluster):
    """The scheduler demands a client certificate: a TLS client that only trusts the CA gets no further."""
    host, port = tls_cluster["address"].removeprefix("tls://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(tls_cluster["ca"]))
    ctx.check_hostname = False
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        try:
            with ctx.wrap_socket(sock) as tls:
                tls.sendall(b"\0" * 8)
                data = tls.recv(1)
        except (ssl.SSLError, ConnectionError):
            data = b""
    assert data == b""


@pytest.mark.parametrize("how", ["certificate of another CA", "plain tcp"])
def test_clients_the_ca_did_not_sign_are_refused(tls_cluster, how):
    if how == "plain tcp":
        p = profile(tls_cluster, tls_cluster["client"], address=tls_cluster["address"].replace("tls://", "tcp://"))
    else:
        p = profile(tls_cluster, tls_cluster["rogue"])
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="cannot reach the dask scheduler") as info:
        with connect_profile(p, "intruder"):
            pass
    assert time.monotonic() - t0 < 10
    assert ("may want TLS: tls://" in str(info.value)) == (how == "plain tcp")  # the wrong scheme said as such
    # Refused by the scheduler, not only by the client. The scheduler is another process and
    # logs the refusal on its own time: wait for the line (bounded), do not race it.
    pattern = re.compile(r"TLS handshake failed .*(certificate verify failed|wrong version number)")
    deadline = time.monotonic() + 10
    while not pattern.search((tls_cluster["dir"] / "scheduler.log").read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pattern.search((tls_cluster["dir"] / "scheduler.log").read_text())


def test_job_runs_through_the_tls_profile(tls_cluster, random_model, scene_path, tmp_path):
    cert, key = tls_cluster["client"]
    job = tmp_path / "secure.yaml"
    job.write_text(yaml.safe_dump({
        "scenes": [{"name": "scene", "path": str(scene_path)}],
        "model": str(random_model),
        "output": "out",
        "chunking": {"chunk_size": 256},
        "outputs": {"cog": True, "vectors": False},
        "cluster": {"profile": "secure", "profiles": {"secure": {
            "kind": "address", "address": tls_cluster["address"], "timeout": "20s",
            "tls": {"ca_file": str(tls_cluster["ca"]), "cert_file": str(cert), "key_file": str(key)}}}},
    }))
    result = CliRunner().invoke(cli, ["run", str(job)])
    assert result.exit_code == 0, result.output + (tls_cluster["dir"] / "worker.log").read_text()[-2000:]
    summary = json.loads((tmp_path / "out" / "job.json").read_text())
    assert summary["cluster"]["scheduler"] == tls_cluster["address"] and summary["cluster"]["workers"] == 1
    (scene,) = summary["scenes"]
    assert scene["status"] == "computed" and scene["chunks"]["computed"] == 4
    assert sorted(p.name for p in (tmp_path / "out" / "scene").iterdir()) == ["classes.qml", "classes.tif", "item.json", "prediction.zarr", "run.json"]
