//! TLS for tests: a throwaway certificate authority made with the `openssl` command ([`TestPki`]) and
//! a `redis-server` of the test's own that speaks only TLS ([`TlsRedis`]). Both remove what they made
//! when dropped, also when the test panics; the server is killed by its pid.
//!
//! The PKI holds, in a temporary directory: `ca.pem` (the test CA), `server.pem`/`server.key` (signed
//! by it, valid for `127.0.0.1` only), `other.pem`/`other.key` (signed by it, valid for
//! `other.example` only), `client.pem`/`client.key` (a client certificate signed by it), and
//! `rogue.pem`/`rogue.key` (valid for `127.0.0.1`, signed by a second CA nobody trusts). Keys are EC
//! P-256, unencrypted PKCS#8.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A test certificate authority and the certificates it signed, in a temporary directory.
#[derive(Debug)]
pub struct TestPki {
    dir: PathBuf,
}

/// Runs `openssl` with `args` in `dir`; false if it cannot be run or fails.
fn openssl(dir: &Path, args: &[&str]) -> bool {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

impl TestPki {
    /// Makes the CA and the certificates; `None` if `openssl` is not installed or fails.
    pub fn new() -> Option<TestPki> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "celerity-pki-{}-{seq}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).ok()?;
        let pki = TestPki { dir };
        pki.make().then_some(pki)
    }

    fn make(&self) -> bool {
        let d = &self.dir;
        let ca = |name: &str, cn: &str| {
            let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
            let mut args = vec!["req", "-x509", "-nodes", "-days", "2"];
            args.extend(EC);
            args.extend([
                "-keyout",
                &key,
                "-out",
                &pem,
                "-subj",
                cn,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            openssl(d, &args)
        };
        let leaf = |name: &str, ca: &str, cn: &str, ext: &str| {
            let (key, csr, pem, extfile) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            let ext = format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n{ext}\n"
            );
            if std::fs::write(d.join(&extfile), ext).is_err() {
                return false;
            }
            let mut req = vec!["req", "-new", "-nodes"];
            req.extend(EC);
            req.extend(["-keyout", &key, "-out", &csr, "-subj", cn]);
            let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
            openssl(d, &req)
                && openssl(
                    d,
                    &[
                        "x509",
                        "-req",
                        "-in",
                        &csr,
                        "-CA",
                        &ca_pem,
                        "-CAkey",
                        &ca_key,
                        "-CAcreateserial",
                        "-days",
                        "2",
                        "-out",
                        &pem,
                        "-extfile",
                        &extfile,
                    ],
                )
        };
        let server = "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1";
        ca("ca", "/CN=celerity test CA")
            && ca("rogue-ca", "/CN=celerity rogue CA")
            && leaf("server", "ca", "/CN=127.0.0.1", server)
            && leaf(
                "other",
                "ca",
                "/CN=other.example",
                "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:other.example",
            )
            && leaf("rogue", "rogue-ca", "/CN=127.0.0.1", server)
            && leaf(
                "client",
                "ca",
                "/CN=celerity test client",
                "extendedKeyUsage=clientAuth",
            )
    }

    /// The path of one of the PKI's files (`ca.pem`, `server.key`, …).
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// `path(file)` as text, for a URL's query string.
    pub fn file(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; a server binds it shortly after).
pub fn free_port() -> Option<u16> {
    Some(
        std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port(),
    )
}

/// A `redis-server` that listens only on a TLS port of 127.0.0.1, presenting `<cert>.pem`; killed
/// when dropped.
#[derive(Debug)]
pub struct TlsRedis {
    child: Child,
    port: u16,
}

impl TlsRedis {
    /// Starts one presenting the PKI's `cert` (`server`, `other`, `rogue`); with
    /// `require_client_cert` it refuses clients without a certificate signed by the test CA.
    /// `None` if `redis-server` (built with TLS) cannot be run here or does not listen within 10 s.
    pub async fn start(pki: &TestPki, cert: &str, require_client_cert: bool) -> Option<TlsRedis> {
        let port = free_port()?;
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", "0"])
            .args(["--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(pki.path(&format!("{cert}.pem")))
            .arg("--tls-key-file")
            .arg(pki.path(&format!("{cert}.key")))
            .arg("--tls-ca-cert-file")
            .arg(pki.path("ca.pem"))
            .args([
                "--tls-auth-clients",
                if require_client_cert { "yes" } else { "no" },
            ])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut server = TlsRedis { child, port };
        let began = Instant::now();
        while began.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = server.child.try_wait() {
                return None;
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Some(server);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        None
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
