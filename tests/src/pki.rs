//! Certificates for the etcd TLS tests, made fresh for every test in a temp
//! dir (ECDSA P-256, by rcgen): two unrelated CAs, so that every way a
//! certificate can be wrong is one file away from a right one.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::TempDir;

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Pki {
    dir: TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        Pki {
            dir: TempDir::new(),
        }
    }

    fn write(&self, name: &str, pem: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    }

    /// Any file in the PKI's directory (a password, a non-PEM file).
    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        self.write(name, content)
    }

    pub fn ca(&self, name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca {
            cert: self.write(&format!("{name}.pem"), &cert.pem()),
            issuer: Issuer::new(p, key),
        }
    }

    /// A certificate signed by `ca` for `sans` (host names or addresses),
    /// good for both server and client authentication.
    pub fn issue(&self, ca: &Ca, name: &str, sans: &[&str]) -> Pair {
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca.issuer).unwrap();
        Pair {
            cert: self.write(&format!("{name}.pem"), &cert.pem()),
            key: self.write(&format!("{name}-key.pem"), &key.serialize_pem()),
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}
