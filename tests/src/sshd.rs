//! A loopback OpenSSH server of the test's own, for SFTP repositories: its own config, host key,
//! client key and authorized_keys in a directory the caller gives, on 127.0.0.1 and a free port,
//! killed on drop. Used by the restic driver's tests (berth-controllers) and the e2e backup tests.
//! Without `/usr/sbin/sshd` or `/usr/bin/ssh` it fails loudly (scripts/test installs both).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SSHD: &str = "/usr/sbin/sshd";
pub const SSH: &str = "/usr/bin/ssh";

/// Fails the test when `binary` is missing, saying how to get it.
pub fn require(binary: &str) {
    assert!(
        Path::new(binary).exists(),
        "{binary} is missing: run scripts/test (it installs restic, openssh-server and openssh-client)"
    );
}

fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running sshd. Logins: the user running the test (root), with [`Sshd::client_key`] only.
pub struct Sshd {
    child: Child,
    pub port: u16,
    /// Its config, keys, `known_hosts` (the host key pinned for `[127.0.0.1]:port`) and `sshd.log`.
    pub dir: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sshd {
    /// Generates the keys and config in `dir` (created) and starts sshd, returning once it listens.
    pub fn start(dir: &Path) -> Sshd {
        require(SSHD);
        require(SSH);
        let dir = dir.to_path_buf();
        fs::create_dir_all(&dir).unwrap();
        // sshd refuses to start without its privilege separation directory (normally made by its
        // init script, which nothing runs here).
        fs::create_dir_all("/run/sshd").unwrap();
        for key in ["host_key", "client_key"] {
            sh(&format!(
                "ssh-keygen -q -t ed25519 -N '' -f '{}'",
                dir.join(key).display()
            ));
        }
        fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host_pub = fs::read_to_string(dir.join("host_key.pub")).unwrap();
        let mut words = host_pub.split_whitespace();
        fs::write(
            dir.join("known_hosts"),
            format!(
                "[127.0.0.1]:{port} {} {}\n",
                words.next().unwrap(),
                words.next().unwrap()
            ),
        )
        .unwrap();
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nUsePAM no\n\
                 StrictModes no\nSubsystem sftp internal-sftp\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let mut sshd = Sshd { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = sshd.child.try_wait().unwrap() {
                panic!(
                    "sshd exited ({status}): {}",
                    fs::read_to_string(sshd.dir.join("sshd.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "sshd did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        sshd
    }

    /// The private key sshd accepts (OpenSSH format, no passphrase).
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_key")
    }

    /// The `known_hosts` file pinning this server's host key.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }
}
