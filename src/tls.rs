//! TLS material: the `wss://` listener's server config, the client config for
//! `wss://` upstreams, and self-signed development certificates.
//!
//! Every config is built with `builder_with_provider` and the `ring` provider,
//! so the process never depends on a process-wide default provider being
//! installed (and never ends up with two).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The one crypto provider tabmux uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a PEM certificate chain and private key into a server config that
/// offers HTTP/1.1 over ALPN (WebSocket upgrades need HTTP/1.1).
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, String> {
    let chain = load_certs(cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read_pem(key)?)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key do not make a usable pair: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A client config that verifies upstream servers against the system's roots
/// plus, when given, the certificates in `extra_ca`.
pub fn client_config(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped, as every TLS client does;
    // an operator who needs a private root names it with `ca`.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        for cert in load_certs(path)? {
            roots
                .add(cert)
                .map_err(|e| format!("bad CA certificate in {}: {e}", path.display()))?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The largest certificate, key or CA file read (CONFIG.md: larger is refused).
pub const MAX_PEM_FILE: u64 = 1 << 20;

/// A PEM file's bytes: a regular file of at most [`MAX_PEM_FILE`] bytes,
/// never read past that bound (a device such as `/dev/zero` is refused
/// before it is opened for reading, and a file that grows is cut short).
pub fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    if meta.len() > MAX_PEM_FILE {
        return Err(format!("{shown} is larger than 1 MiB"));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_FILE + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(format!("{shown} is larger than 1 MiB"));
    }
    Ok(bytes)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&read_pem(path)?)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad PEM in {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate found in {}", path.display()));
    }
    Ok(certs)
}

/// A freshly generated self-signed certificate and its key, both PEM.
pub struct DevCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Generates a self-signed certificate for `localhost`, `127.0.0.1` and `::1`
/// (development only: browsers will warn about it).
pub fn generate_dev_cert() -> Result<DevCert, rcgen::Error> {
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(names)?;
    Ok(DevCert {
        cert_pem: cert.pem(),
        key_pem: signing_key.serialize_pem(),
    })
}

/// Writes `dev.crt` and `dev.key` into `dir` and returns their paths.
pub fn write_dev_cert(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    use anyhow::Context;
    let pair = generate_dev_cert().context("generating a certificate")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cert = dir.join("dev.crt");
    let key = dir.join("dev.key");
    std::fs::write(&cert, pair.cert_pem).with_context(|| format!("writing {}", cert.display()))?;
    write_private(&key, pair.key_pem.as_bytes())
        .with_context(|| format!("writing {}", key.display()))?;
    Ok((cert, key))
}

/// Writes a file readable by its owner only (private keys).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pair_loads_as_a_server_config() {
        let dir = std::env::temp_dir().join(format!("tabmux-tls-{}", std::process::id()));
        let (cert, key) = write_dev_cert(&dir).unwrap();
        let config = server_config(&cert, &key).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        // The same file works as an extra CA root for a client.
        client_config(Some(&cert)).unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn missing_files_say_which() {
        let err = server_config(Path::new("/nonexistent/a.crt"), Path::new("/x.key")).unwrap_err();
        assert!(err.contains("/nonexistent/a.crt"), "{err}");
    }

    #[test]
    fn special_and_oversized_files_are_refused_without_reading_them() {
        let err = read_pem(Path::new("/dev/zero")).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        let err = read_pem(Path::new("/")).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        let dir = std::env::temp_dir().join(format!("tabmux-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.pem");
        std::fs::write(&big, vec![b'A'; MAX_PEM_FILE as usize + 1]).unwrap();
        let err = read_pem(&big).unwrap_err();
        assert!(err.contains("larger than 1 MiB"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
