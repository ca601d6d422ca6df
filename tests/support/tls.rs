//! Throwaway certificates for the TLS tests, made with the `openssl` CLI by
//! one signing function: a CA, server certificates for 127.0.0.1 and client
//! certificates, P-256 keys, valid for 2 days.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::process::on_path;
use super::server::{local_url, ping};

/// Message of the panic raised when a TLS test needs the `openssl` CLI.
pub const NO_OPENSSL_MESSAGE: &str = "the TLS tests need the openssl CLI to make throwaway \
     certificates: install it (Debian: apt-get install -y openssl) — or run scripts/test.sh, \
     which installs it";

/// Every certificate's profile, one section each; the CA's name is the same
/// for every CA made here (tests/tls.rs relies on that).
const CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = ticketlock test

[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[v3_client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// Serial numbers, unique within this process.
static SERIAL: AtomicU64 = AtomicU64::new(1);

/// A throwaway CA and a server certificate for `127.0.0.1` (and
/// `localhost`) signed by it, as PEM files (see [`generate_tls_certs`]).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate (self-signed): trust this to verify the server.
    pub ca_cert: PathBuf,
    /// The CA's private key.
    pub ca_key: PathBuf,
    /// The server certificate (SAN `IP:127.0.0.1`, `DNS:localhost`).
    pub cert: PathBuf,
    /// The server certificate's private key.
    pub key: PathBuf,
}

/// A client certificate and its key, as PEM files (see [`generate_client_cert`]).
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// The certificate, signed by the CA it was made with.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// Certificate and key in one file.
    pub combined: PathBuf,
}

/// What a client trusts and presents when it pings a TLS server.
#[derive(Debug, Clone, Copy)]
pub struct ClientTls<'a> {
    /// The CA the server's certificate must chain to.
    pub ca_cert: &'a Path,
    /// The certificate to present, if the server asks for one.
    pub client: Option<&'a ClientCert>,
}

impl ClientTls<'_> {
    /// The files, read, as redis-rs takes them.
    pub(super) fn certificates(self) -> redis::RedisResult<redis::TlsCertificates> {
        let client_tls = match self.client {
            Some(client) => Some(redis::ClientTlsConfig {
                client_cert: fs::read(&client.cert)?,
                client_key: fs::read(&client.key)?,
            }),
            None => None,
        };
        Ok(redis::TlsCertificates {
            client_tls,
            root_cert: Some(fs::read(self.ca_cert)?),
        })
    }
}

/// Generates a throwaway CA and a server certificate for `127.0.0.1` /
/// `localhost` signed by it into `dir` (`ca.crt`, `ca.key`, `server.crt`,
/// `server.key`). Panics with openssl's output if that fails, or if openssl
/// is missing.
pub fn generate_tls_certs(dir: &Path) -> TlsFiles {
    let (ca_cert, ca_key) = sign(dir, "ca", "/CN=ticketlock test CA", "v3_ca", None);
    let (cert, key) = sign(
        dir,
        "server",
        "/CN=127.0.0.1",
        "v3_server",
        Some((&ca_cert, &ca_key)),
    );
    TlsFiles {
        ca_cert,
        ca_key,
        cert,
        key,
    }
}

/// Makes a client certificate (`CN=ticketlock test client`, extended key
/// usage `clientAuth`) signed by `ca`'s CA into `dir` (`client.crt`,
/// `client.key`, and both in `client.pem`). Panics with openssl's output if
/// that fails.
pub fn generate_client_cert(dir: &Path, ca: &TlsFiles) -> ClientCert {
    let (cert, key) = sign(
        dir,
        "client",
        "/CN=ticketlock test client",
        "v3_client",
        Some((&ca.ca_cert, &ca.ca_key)),
    );
    let combined = dir.join("client.pem");
    let mut pem = fs::read(&cert).expect("reading the client certificate");
    pem.extend(fs::read(&key).expect("reading the client key"));
    fs::write(&combined, pem).expect("writing client.pem");
    ClientCert {
        cert,
        key,
        combined,
    }
}

/// The one signing function: a new key `dir/<name>.key` and a certificate
/// `dir/<name>.crt` for `subject` with the `extensions` section of
/// [`CONFIG`], signed by `issuer` (certificate, key), or by its own key
/// when there is none (a CA).
fn sign(
    dir: &Path,
    name: &str,
    subject: &str,
    extensions: &str,
    issuer: Option<(&Path, &Path)>,
) -> (PathBuf, PathBuf) {
    ensure_openssl_installed();
    let config = dir.join("openssl.cnf");
    let (cert, key, csr) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.csr")),
    );
    fs::write(&config, CONFIG).unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
    run_openssl(
        Command::new("openssl")
            .args(["req", "-new", "-config"])
            .arg(&config)
            .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
            .args(["-nodes", "-subj", subject, "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&csr),
    );
    let mut x509 = Command::new("openssl");
    x509.args(["x509", "-req", "-in"]).arg(&csr);
    match issuer {
        Some((ca_cert, ca_key)) => x509.arg("-CA").arg(ca_cert).arg("-CAkey").arg(ca_key),
        None => x509.arg("-signkey").arg(&key),
    };
    let serial = format!("0x{:x}", SERIAL.fetch_add(1, Ordering::Relaxed));
    run_openssl(
        x509.args(["-set_serial", &serial, "-days", "2", "-extfile"])
            .arg(&config)
            .args(["-extensions", extensions, "-out"])
            .arg(&cert),
    );
    (cert, key)
}

/// True if the TLS port `127.0.0.1:<port>` answers `PING` within `timeout`,
/// after authenticating with `password` if given, verifying the server
/// certificate against `ca_cert` and the IP 127.0.0.1 (so it also proves the
/// certificates are right).
pub fn tls_ping(port: u16, ca_cert: &Path, password: Option<&str>, timeout: Duration) -> bool {
    let trust = ClientTls {
        ca_cert,
        client: None,
    };
    ping(&local_url(true, password, port), Some(trust), timeout)
}

/// Panics with [`NO_OPENSSL_MESSAGE`] unless `openssl` is on `PATH`.
pub(super) fn ensure_openssl_installed() {
    if on_path("openssl").is_none() {
        panic!("{NO_OPENSSL_MESSAGE}");
    }
}

fn run_openssl(command: &mut Command) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running openssl: {e}\n{NO_OPENSSL_MESSAGE}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
