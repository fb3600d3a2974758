"""A real Dovecot IMAP server for tests and benchmarks, started unprivileged on loopback.

Each instance gets its own temp directory (config, passwd-file, maildir, runtime dirs) and a free
port; `stop()` ends it within a few seconds. Dovecot's auth process runs as an unprivileged user,
so every directory above the passwd-file must be searchable by it: the constructor makes the
path readable (a pytest ``tmp_path`` is 0700 when tests run as root).

With ``tls`` (a `trustme.CA`), the plain port also offers STARTTLS with a certificate for
``127.0.0.1`` / ``localhost`` signed by that CA.

XOAUTH2: Dovecot's mechanism hands the bearer token to the passdb like a password, so a
passwd-file user whose password is the token can log in with ``oauth2_login`` — enough to test the
gateway's OAuth2 path without an identity provider.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from imapclient import IMAPClient

from tests.net import free_port

USER = "alerts"
PASSWORD = "s3cret-pass"
OAUTH_USER = "oauth"
OAUTH_TOKEN = "ya29.test-access-token"

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVEADM = shutil.which("doveadm") or "/usr/bin/doveadm"


def dovecot_available() -> bool:
    return Path(DOVECOT).is_file() and os.access(DOVECOT, os.X_OK)


def require_dovecot() -> None:
    """Skip when Dovecot is not installed, but fail under CI: there these tests must run."""
    import pytest

    if dovecot_available():
        return
    if os.environ.get("CI"):
        pytest.fail(
            f"dovecot is required when CI is set ({DOVECOT} missing; apt-get install dovecot-imapd)"
        )
    pytest.skip("dovecot not installed (apt-get install dovecot-imapd)")


def _open_path_to(path: Path) -> None:
    """chmod o+x every directory from / down to `path` (the auth process is not us)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o005 != 0o005:
            parent.chmod(mode | 0o755)


class Dovecot:
    """One Dovecot instance; `start()` blocks until it greets on its port."""

    def __init__(self, directory: Path, *, tls=None) -> None:  # tls: trustme.CA | None
        # Not under pytest's basetemp: another pytest session on the machine resets that root to
        # 0700 at its start, which would lock Dovecot's auth process (not root) out mid-test.
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"gateway-{directory.name[:40]}-"))
        atexit.register(shutil.rmtree, self.dir, True)
        self.port = free_port()
        self.host = "127.0.0.1"
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "dovecot.log"
        self.config = directory / "dovecot.conf"
        self.mail_user = self._mail_user()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> Dovecot:
        if not dovecot_available():
            raise RuntimeError(f"dovecot not found at {DOVECOT} (apt-get install dovecot-imapd)")
        self._write_files()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._greets():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dovecot did not start:\n{self.output()}")
            time.sleep(0.05)
        return self

    def stop(self, grace: float = 0.3) -> None:
        """SIGTERM the master; its orderly shutdown waits about a second for its children, which
        tests need not pay for, so after `grace` the whole process group gets SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.thaw()  # a stopped process would keep SIGTERM pending
        self.proc.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _greets(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                return sock.recv(100).startswith(b"* OK")
        except OSError:
            return False

    # -- helpers for tests ---------------------------------------------------------------

    def client(self, user: str = USER, password: str = PASSWORD) -> IMAPClient:
        """A logged-in plain-text client (tests APPEND with it)."""
        client = IMAPClient(self.host, self.port, ssl=False, timeout=10)
        client.login(user, password)
        return client

    def append(
        self, raw: bytes, folder: str = "INBOX", user: str = USER, flags: tuple[bytes, ...] = ()
    ) -> None:
        with self.client(user, PASSWORD if user == USER else OAUTH_TOKEN) as client:
            client.append(folder, raw, flags=flags)

    def imap_worker_pids(self) -> list[int]:
        """PIDs of this instance's `dovecot/imap` worker processes (one per logged-in session)."""
        assert self.proc is not None
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if (
                ppid == self.proc.pid
                and cmdline.startswith(b"dovecot/imap")
                and b"login" not in cmdline
            ):
                pids.append(int(entry.name))
        return pids

    def kill_imap_workers(self) -> list[int]:
        pids = self.imap_worker_pids()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def freeze(self) -> None:
        """SIGSTOP every Dovecot process (they share the master's process group): the server
        keeps its sockets and accepts TCP connections, but never answers, like a hung host."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)

    def maildir(self, user: str = USER) -> Path:
        return self.dir / "mail" / user

    def deliver(self, raw: bytes, user: str = USER) -> None:
        """Deliver into the INBOX maildir directly, as a local delivery agent does (tmp/, then a
        rename into new/): mail arrives even while the IMAP server is frozen."""
        box = self.maildir(user)
        name = f"{time.time():.6f}.P{os.getpid()}.gateway-test"
        tmp = box / "tmp" / name
        tmp.write_bytes(raw)
        os.chown(tmp, self.mail_user.pw_uid, self.mail_user.pw_gid)
        tmp.rename(box / "new" / name)

    def message_file(self, uid: int, user: str = USER) -> Path:
        """The maildir file of INBOX message `uid` (from Dovecot's dovecot-uidlist)."""
        box = self.maildir(user)
        for line in (box / "dovecot-uidlist").read_text().splitlines()[1:]:
            number, _, base = line.partition(" :")
            if number.split()[0] == str(uid):
                [path] = [p for sub in ("new", "cur") for p in (box / sub).glob(f"{base}*")]
                return path
        raise LookupError(f"no message with UID {uid} in {box}")

    def doveadm(self, *args: str) -> str:
        result = subprocess.run(
            [DOVEADM, "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    # -- files ---------------------------------------------------------------------------

    def _mail_user(self) -> pwd.struct_passwd:
        """Dovecot refuses mail access as root; as root we store mail as `nobody`."""
        if os.geteuid() == 0:
            return pwd.getpwnam("nobody")
        return pwd.getpwuid(os.getuid())

    def _write_files(self) -> None:
        for sub in ("run", "state", "mail", "home"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        uid, gid = self.mail_user.pw_uid, self.mail_user.pw_gid
        passwd = self.dir / "passwd"
        passwd.write_text(
            f"{USER}:{{PLAIN}}{PASSWORD}:{uid}:{gid}::{self.dir / 'home' / USER}::\n"
            f"{OAUTH_USER}:{{PLAIN}}{OAUTH_TOKEN}:{uid}:{gid}::{self.dir / 'home' / OAUTH_USER}::\n"
        )
        passwd.chmod(0o644)
        if os.geteuid() == 0:
            for sub in ("mail", "home"):
                os.chown(self.dir / sub, uid, gid)
        _open_path_to(self.dir)
        self.config.write_text(self._config_text())
        self.config.chmod(0o644)

    def _config_text(self) -> str:
        d = self.dir
        if os.geteuid() == 0:
            users = "default_internal_user = dovecot\ndefault_login_user = dovenull\n"
        else:
            me = self.mail_user.pw_name
            users = f"default_internal_user = {me}\ndefault_login_user = {me}\n"
        return f"""
protocols = imap
listen = 127.0.0.1
base_dir = {d / "run"}
state_dir = {d / "state"}
log_path = /dev/stderr
info_log_path = /dev/stderr
{users}
first_valid_uid = {min(self.mail_user.pw_uid, 100)}
first_valid_gid = {min(self.mail_user.pw_gid, 100)}
last_valid_uid = 0
disable_plaintext_auth = no
auth_failure_delay = 0
auth_mechanisms = plain login xoauth2
mail_location = maildir:{d / "mail"}/%u
mail_uid = {self.mail_user.pw_uid}
mail_gid = {self.mail_user.pw_gid}
{self._ssl_text()}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d / "passwd"}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {d / "passwd"}
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
  # no auth penalty (up to 15 s delay after failed logins): the backoff tests time our retries
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""

    def _ssl_text(self) -> str:
        if self.tls is None:
            return "ssl = no"
        cert = self.tls.issue_cert("127.0.0.1", "localhost")
        chain, key = self.dir / "cert.pem", self.dir / "key.pem"
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        key.write_bytes(cert.private_key_pem.bytes())
        return f"ssl = yes\nssl_cert = <{chain}\nssl_key = <{key}"
