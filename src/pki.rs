//! A development PKI: one CA per region, and certificates for brokers,
//! services, operators and auditors with the URI SANs sovkms expects.
//! Real deployments bring their own CA (see README, "Certificates").

use crate::region::{Region, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::Path;
use zeroize::Zeroizing;

/// A certificate and its private key, PEM.
pub struct Issued {
    /// Certificate.
    pub cert_pem: String,
    /// Private key; zeroized on drop.
    pub key_pem: Zeroizing<String>,
}

/// What a certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A broker (server certificate).
    Broker,
    /// A caller with a role (client certificate).
    Caller(Role),
}

/// A PKI failure.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Certificate generation.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// Files.
    #[error("{path}: {err}")]
    Io {
        /// file
        path: String,
        /// cause
        err: std::io::Error,
    },
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
}

fn validity(p: &mut CertificateParams, days: u32) {
    validity_for(p, std::time::Duration::from_secs(u64::from(days) * 86_400));
}

fn validity_for(p: &mut CertificateParams, lifetime: std::time::Duration) {
    let now = time_now();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + lifetime;
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// A self-signed CA for one region.
pub fn new_ca(trust_domain: &str, region: &Region, days: u32) -> Result<Issued, PkiError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("sovkms {region} CA ({trust_domain})"),
    );
    dn.push(DnType::OrganizationName, "sovkms development PKI");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, days);
    let cert = p.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: Zeroizing::new(key.serialize_pem()),
    })
}

/// The SPIFFE id a certificate of `kind` carries.
pub fn spiffe_id(trust_domain: &str, region: &Region, kind: Kind, name: &str) -> String {
    let role = match kind {
        Kind::Broker => "broker",
        Kind::Caller(r) => r.as_str(),
    };
    format!("spiffe://{trust_domain}/region/{region}/{role}/{name}")
}

/// Issues a certificate signed by the CA (`ca_cert_pem`, `ca_key_pem`).
/// Brokers also get `dns_names` (and 127.0.0.1) for server-name checks.
#[allow(clippy::too_many_arguments)]
pub fn issue(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    trust_domain: &str,
    region: &Region,
    kind: Kind,
    name: &str,
    dns_names: &[String],
    days: u32,
) -> Result<Issued, PkiError> {
    issue_for(
        ca_cert_pem,
        ca_key_pem,
        trust_domain,
        region,
        kind,
        name,
        dns_names,
        std::time::Duration::from_secs(u64::from(days) * 86_400),
    )
}

/// [`issue`] with a lifetime of any length (short-lived certificates).
#[allow(clippy::too_many_arguments)]
pub fn issue_for(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    trust_domain: &str,
    region: &Region,
    kind: Kind,
    name: &str,
    dns_names: &[String],
    lifetime: std::time::Duration,
) -> Result<Issued, PkiError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{name} ({region})"));
    p.distinguished_name = dn;
    let uri = spiffe_id(trust_domain, region, kind, name);
    let mut sans =
        vec![SanType::URI(uri.clone().try_into().map_err(|_| {
            PkiError::Invalid(format!("{uri} is not a valid URI"))
        })?)];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    match kind {
        Kind::Broker => {
            for d in dns_names {
                sans.push(SanType::DnsName(d.clone().try_into()?));
            }
            sans.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
        Kind::Caller(_) => {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    p.subject_alt_names = sans;
    p.use_authority_key_identifier_extension = true;
    validity_for(&mut p, lifetime);
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: Zeroizing::new(key.serialize_pem()),
    })
}

/// A CRL (PEM) of a development CA listing `revoked` certificates (PEM)
/// as revoked now, valid for `days`.
pub fn crl(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    revoked: &[&str],
    days: u32,
) -> Result<String, PkiError> {
    use rcgen::{CertificateRevocationListParams, RevokedCertParams, SerialNumber};
    use x509_parser::prelude::{FromDer, X509Certificate};
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)?;
    let now = time_now();
    let mut revoked_certs = Vec::new();
    for pem in revoked {
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| PkiError::Invalid(format!("not a PEM certificate: {e}")))?;
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| PkiError::Invalid(format!("not a certificate: {e}")))?;
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(cert.raw_serial()),
            revocation_time: now,
            reason_code: Some(rcgen::RevocationReason::KeyCompromise),
            invalidity_date: None,
        });
    }
    let params = CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(5),
        next_update: now + time::Duration::days(i64::from(days.max(1))),
        crl_number: SerialNumber::from(u64::try_from(now.unix_timestamp()).unwrap_or(1)),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&issuer)?.pem()?)
}

/// Writes `<stem>.pem` and `<stem>.key` (mode 0600) into `dir`.
pub fn write(dir: &Path, stem: &str, issued: &Issued) -> Result<(), PkiError> {
    let io = |p: &Path, err| PkiError::Io {
        path: p.display().to_string(),
        err,
    };
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    crate::files::write_file_durably(&cert, issued.cert_pem.as_bytes(), 0o644)
        .map_err(|e| io(&cert, e))?;
    crate::files::write_file_durably(&key, issued.key_pem.as_bytes(), 0o600)
        .map_err(|e| io(&key, e))?;
    Ok(())
}

/// Reads a file to a string, naming it on error.
pub fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|err| PkiError::Io {
        path: path.display().to_string(),
        err,
    })
}

/// Mints a whole development PKI under `out`: per region a CA, a broker
/// certificate and one service (`app`), operator (`admin`) and auditor
/// (`audit`) identity. Files: `<out>/<region>/{ca,broker,service-app,...}.{pem,key}`.
pub fn dev_pki(
    out: &Path,
    trust_domain: &str,
    regions: &[Region],
    days: u32,
) -> Result<(), PkiError> {
    for region in regions {
        let dir = out.join(region.as_str());
        let ca = new_ca(trust_domain, region, days)?;
        write(&dir, "ca", &ca)?;
        let dns = vec!["localhost".to_string(), format!("broker.{region}")];
        let b = issue(
            &ca.cert_pem,
            &ca.key_pem,
            trust_domain,
            region,
            Kind::Broker,
            "broker",
            &dns,
            days,
        )?;
        write(&dir, "broker", &b)?;
        for (role, name) in [
            (Role::Service, "app"),
            (Role::Operator, "admin"),
            (Role::Auditor, "audit"),
        ] {
            let c = issue(
                &ca.cert_pem,
                &ca.key_pem,
                trust_domain,
                region,
                Kind::Caller(role),
                name,
                &[],
                days,
            )?;
            write(&dir, &format!("{}-{name}", role.as_str()), &c)?;
        }
    }
    Ok(())
}

/// A broker config for the development PKI made by [`dev_pki`]: the broker
/// of `region` trusts each region's CA for that region only. `root_toml` is
/// the `[root]` table's body.
pub fn dev_broker_config(
    pki_dir: &Path,
    data_dir: &Path,
    region: &Region,
    trust_domain: &str,
    all_regions: &[Region],
    root_toml: &str,
) -> String {
    let mut s = format!(
        "# Development broker for region {region} (generated).\n\
         region = \"{region}\"\n\
         trust_domain = \"{trust_domain}\"\n\
         broker_id = \"{region}-dev\"\n\
         listen = \"127.0.0.1:0\"\n\
         data_dir = \"{data}\"\n\n\
         [tls]\n\
         cert = \"{pki}/{region}/broker.pem\"\n\
         key = \"{pki}/{region}/broker.key\"\n",
        data = data_dir.display(),
        pki = pki_dir.display(),
    );
    for r in all_regions {
        s.push_str(&format!(
            "\n[[tls.client_ca]]\ncert = \"{pki}/{r}/ca.pem\"\nregions = [\"{r}\"]\n",
            pki = pki_dir.display()
        ));
    }
    s.push_str("\n[root]\n");
    s.push_str(root_toml);
    s
}

/// `[root]` body for the development software root.
pub const DEV_SOFTWARE_ROOT: &str = "kind = \"software\"\ndanger_development_only = true\n";

/// `[root]` body for a PKCS#11 token.
pub fn pkcs11_root_toml(profile: &str, token_label: &str, pin_file: &Path) -> String {
    format!(
        "kind = \"pkcs11\"\nprofile = \"{profile}\"\ntoken_label = \"{token_label}\"\npin_file = \"{}\"\n",
        pin_file.display()
    )
}
