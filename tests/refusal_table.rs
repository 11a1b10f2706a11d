//! Every sentence the core can answer with, rendered with example facts,
//! must appear exactly in ARCHITECTURE.md's refusal table (between the
//! `refusals:begin` and `refusals:end` markers), and the table must hold
//! nothing else. Run with `SOVKMS_BLESS=1` to rewrite the table after a
//! deliberate change of wording.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sovkms::envelope::{ContextError, FormatError, OpenError};
use sovkms::error::{Error, Invalid, Limit, NotFound, Precondition, Unavailable};
use sovkms::id::{KeyId, KeyState};
use sovkms::policy::breakglass::BreakGlassInvalid;
use sovkms::policy::{CryptoOp, GrantError, Operation, Reach, Refusal};
use sovkms::region::{IdentityError, Region, Role, SpiffeError};

const BEGIN: &str = "<!-- refusals:begin -->";
const END: &str = "<!-- refusals:end -->";

fn r(s: &str) -> Region {
    Region::parse(s).unwrap()
}

fn key() -> KeyId {
    KeyId::parse("k-1").unwrap()
}

const APP: &str = "spiffe://example/region/eu-central/service/app";
/// 2026-01-01T00:00:00Z
const AT: i64 = 1_767_225_600;

fn rows() -> Vec<(String, String, Error)> {
    let mut out: Vec<(String, String, Error)> = Vec::new();
    let mut row = |op: &str, why: &str, e: Error| out.push((op.to_owned(), why.to_owned(), e));
    for op in Operation::ALL {
        let rule = op.rule();
        if rule.roles.is_empty() {
            continue; // done by the broker itself, never asked for
        }
        let name = op.name();
        if rule.named_readers {
            row(
                name,
                "not an auditor of the region nor a named reader",
                Refusal::NotAggregateReader {
                    principal: APP.into(),
                    region: r("eu-central"),
                }
                .into(),
            );
            continue;
        }
        if rule.creators_only {
            row(
                name,
                "service not named in key_creators",
                Refusal::NotKeyCreator {
                    principal: APP.into(),
                    region: r("eu-central"),
                }
                .into(),
            );
        }
        if rule.service_grant.is_some() {
            row(
                name,
                "service without a manage grant on the key",
                Refusal::NoGrant {
                    op,
                    principal: APP.into(),
                    key: key(),
                }
                .into(),
            );
        }
        for role in [Role::Service, Role::Operator, Role::Auditor] {
            if rule.service_grant.is_some() && role == Role::Service {
                continue;
            }
            if !rule.roles.contains(&role) {
                row(
                    name,
                    &format!("caller is {}", role.as_str()),
                    Refusal::Role { role, op }.into(),
                );
            }
        }
        if rule.reach != Reach::Anywhere {
            row(
                name,
                "caller of another region",
                Refusal::OutsideRegion {
                    op,
                    caller: r("us-east"),
                    broker: r("eu-central"),
                }
                .into(),
            );
        }
        if rule.reach == Reach::Resident {
            row(
                name,
                "key of another region",
                Refusal::Residency {
                    op,
                    caller: r("eu-central"),
                    data: r("us-east"),
                }
                .into(),
            );
        }
        if rule.grant.is_some() {
            row(
                name,
                "no grant",
                Refusal::NoGrant {
                    op,
                    principal: APP.into(),
                    key: key(),
                }
                .into(),
            );
            row(
                name,
                "key scheduled for destruction",
                Precondition::ScheduledForDestruction { key: key(), at: AT }.into(),
            );
            for state in [
                KeyState::PreActive,
                KeyState::Active,
                KeyState::Deactivated,
                KeyState::Compromised,
                KeyState::Destroyed,
            ] {
                if !rule.states.contains(&state) {
                    row(
                        name,
                        &format!("key {}", state.as_str()),
                        Precondition::KeyState {
                            key: key(),
                            state,
                            op,
                        }
                        .into(),
                    );
                }
            }
        } else if !rule.states.contains(&KeyState::Destroyed) {
            row(
                name,
                "key destroyed",
                Precondition::KeyDestroyed(key()).into(),
            );
        }
    }
    let any = "any";
    row(
        any,
        "certificate of another trust domain",
        Refusal::TrustDomain {
            caller: "other.example".into(),
            broker: "example".into(),
        }
        .into(),
    );
    for (why, e) in [
        ("no client certificate", IdentityError::NoCertificate),
        ("no SPIFFE id", IdentityError::NoSpiffeId),
        ("two SPIFFE ids", IdentityError::SeveralSpiffeIds),
        (
            "unknown role in the SPIFFE id",
            IdentityError::Spiffe(SpiffeError::Role {
                uri: "spiffe://example/region/eu-central/admin/x".into(),
                role: "admin".into(),
            }),
        ),
        (
            "CA not trusted for the region",
            IdentityError::UntrustedForRegion {
                caller: APP.into(),
                region: r("eu-central"),
            },
        ),
    ] {
        row(any, why, Refusal::NoIdentity(e).into());
    }
    let crypto = "decrypt, re-encrypt";
    row(crypto, "empty ciphertext", Invalid::EmptyCiphertext.into());
    row(crypto, "not a ciphertext", FormatError::BadMagic.into());
    row(
        crypto,
        "truncated ciphertext",
        FormatError::Truncated("salt").into(),
    );
    row(
        crypto,
        "unknown format version",
        FormatError::UnknownVersion(9).into(),
    );
    row(
        crypto,
        "one trailing byte",
        FormatError::TrailingBytes(1).into(),
    );
    row(
        crypto,
        "trailing bytes",
        FormatError::TrailingBytes(2).into(),
    );
    row(crypto, "altered or other context", OpenError.into());
    row(
        crypto,
        "version the key never had",
        Invalid::NoSuchVersion {
            key: key(),
            version: 9,
        }
        .into(),
    );
    row(
        crypto,
        "ciphertext of another region",
        Precondition::ForeignCiphertext {
            data: r("eu-central"),
            broker: r("us-east"),
        }
        .into(),
    );
    row(
        crypto,
        "version destroyed",
        Precondition::VersionDestroyed {
            key: key(),
            version: 1,
        }
        .into(),
    );
    row(
        "encrypt",
        "plaintext over the limit",
        Limit::Plaintext {
            len: 70_000,
            max: 65_536,
        }
        .into(),
    );
    row(
        "create-key, set-grants",
        "grant without operations",
        GrantError::NoOperation {
            principal: APP.into(),
        }
        .into(),
    );
    row(
        "create-key, set-grants",
        "grant to an operator",
        GrantError::NotService {
            principal: APP.into(),
        }
        .into(),
    );
    row(
        "create-key, set-grants",
        "residency-bound grant to another region",
        GrantError::OtherRegion {
            op: CryptoOp::Decrypt,
            principal: "spiffe://example/region/us-east/service/app".into(),
            broker: r("eu-central"),
        }
        .into(),
    );
    row(
        "create-key, set-grants",
        "too many grants",
        Limit::Grants { len: 300, max: 256 }.into(),
    );
    row(
        "create-key",
        "empty name",
        Invalid::Empty { field: "name" }.into(),
    );
    row(
        "create-key",
        "long description",
        Invalid::TooLong {
            field: "description",
            max: 1024,
        }
        .into(),
    );
    row(
        "create-key",
        "control characters",
        Invalid::ControlCharacters { field: "name" }.into(),
    );
    row(
        "activate-key",
        "not pre-active",
        Precondition::NotPreActive {
            key: key(),
            state: KeyState::Active,
        }
        .into(),
    );
    row(
        "activate-key",
        "key scheduled for destruction",
        Precondition::ActivateScheduled(key()).into(),
    );
    row(
        "schedule-key-destruction",
        "window out of range",
        Invalid::DestroyWindow(0).into(),
    );
    row(
        "schedule-key-destruction",
        "already scheduled",
        Precondition::AlreadyScheduled { key: key(), at: AT }.into(),
    );
    row(
        "cancel-key-destruction",
        "not scheduled",
        Precondition::NotScheduled(key()).into(),
    );
    row(
        "rekey",
        "key not active",
        Precondition::NotRekeyable {
            key: key(),
            state: KeyState::Deactivated,
        }
        .into(),
    );
    row(
        "rekey",
        "key scheduled for destruction",
        Precondition::RekeyScheduled(key()).into(),
    );
    row("rekey", "too many versions", Limit::Versions(key()).into());
    row("locate", "page too large", Invalid::PageSize(5000).into());
    row(
        "any with a key id",
        "unknown key",
        NotFound::Key {
            key: key(),
            region: r("eu-central"),
        }
        .into(),
    );
    let bg = "request-break-glass";
    for (why, e) in [
        (
            "service of another region",
            BreakGlassInvalid::OtherRegion {
                principal: "spiffe://example/region/us-east/service/app".into(),
                region: r("eu-central"),
            },
        ),
        ("not one service", BreakGlassInvalid::NotOneService),
        ("no operation", BreakGlassInvalid::NoOperation),
        (
            "duration out of range",
            BreakGlassInvalid::Duration {
                minutes: 90,
                max: 60,
            },
        ),
        ("no or bad reason", BreakGlassInvalid::Reason),
        ("manage asked for", BreakGlassInvalid::Manage),
    ] {
        row(bg, why, e.into());
    }
    row(
        "approve-break-glass",
        "requester approves",
        Refusal::SelfApproval {
            grant: "bg-1".into(),
        }
        .into(),
    );
    row(
        "approve-break-glass",
        "approved twice",
        Precondition::AlreadyApproved {
            principal: "spiffe://example/region/eu-central/operator/o1".into(),
            id: "bg-1".into(),
        }
        .into(),
    );
    row(
        "approve-break-glass, revoke-break-glass",
        "grant not pending or active",
        Precondition::BreakGlassState {
            id: "bg-1".into(),
            state: "expired",
        }
        .into(),
    );
    row(
        "approve-break-glass, revoke-break-glass",
        "unknown grant",
        NotFound::BreakGlass("bg-1".into()).into(),
    );
    row(
        "read-audit-aggregates",
        "window not whole past days",
        Invalid::AggregateWindow.into(),
    );
    let objects = "kmip objects";
    row(
        objects,
        "export of a key not created exportable",
        Precondition::NotExportable(key()).into(),
    );
    row(
        objects,
        "export or caller-parameter cryptography with an envelope key",
        Precondition::EnvelopeKey(key()).into(),
    );
    row(
        "encrypt, decrypt, generate-data-key, re-encrypt",
        "key created or registered over KMIP",
        Precondition::ManagedObject(key()).into(),
    );
    row(
        objects,
        "encrypt or decrypt with secret data",
        Precondition::NotAKey(key()).into(),
    );
    row(
        objects,
        "name of another live object",
        Precondition::NameInUse("db-key".into()).into(),
    );
    row(
        objects,
        "registered key of the wrong length",
        Invalid::MaterialLength { got: 15, bits: 128 }.into(),
    );
    row(
        objects,
        "AES length not 128, 192 or 256",
        Invalid::AesLength(512).into(),
    );
    row(
        objects,
        "secret data empty or too long",
        Invalid::SecretLength { got: 0, max: 4096 }.into(),
    );
    row(
        objects,
        "operation the front end does not offer",
        Invalid::Unsupported("the KMIP operation with code 0x6".into()).into(),
    );
    {
        use sovkms::broker::CipherError as C;
        for (why, e) in [
            (
                "IV of the wrong length",
                C::IvLength {
                    mode: "AES-GCM",
                    want: 12,
                    got: 8,
                },
            ),
            ("decrypt without an IV", C::MissingIv("AES-CBC")),
            ("tag length not 16", C::TagLength(8)),
            ("decrypt without the tag", C::MissingTag(0)),
            (
                "CBC without padding over a partial block",
                C::PartialBlock(5),
            ),
            ("authentication or padding failed", C::Failed),
        ] {
            row(
                "encrypt, decrypt (kmip objects)",
                why,
                Invalid::Cipher(e).into(),
            );
        }
    }
    row("attest", "no TPM configured", Precondition::NoTpm.into());
    row("attest", "nonce length", Invalid::NonceLength(4).into());
    row(
        any,
        "caller over its rate",
        Limit::CallerRate {
            principal: APP.into(),
            per_second: 20_000,
        }
        .into(),
    );
    row(
        any,
        "region over its rate",
        Limit::RegionRate {
            region: r("us-east"),
            per_second: 50_000,
        }
        .into(),
    );
    for (why, e) in [
        ("key store down", Unavailable::Store),
        ("HSM or TPM down", Unavailable::RootOfTrust),
        ("audit log not writable", Unavailable::AuditWrite),
        ("audit log not readable", Unavailable::AuditRead),
        ("random generator failed", Unavailable::Random),
        ("TPM quote failed", Unavailable::Tpm),
    ] {
        row(any, why, e.into());
    }
    out
}

fn render() -> String {
    let mut t = String::from("| operation | when | code | sentence |\n|---|---|---|---|\n");
    for (op, why, e) in rows() {
        let sentence = e.to_string();
        assert!(
            !sentence.is_empty() && !sentence.contains('\n'),
            "{op} {why}: {sentence:?}"
        );
        t.push_str(&format!(
            "| {op} | {why} | `{}` | {} |\n",
            e.code_name(),
            sentence.replace('|', "\\|")
        ));
    }
    t
}

#[test]
fn every_refusal_sentence_is_in_the_architecture_table() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let (a, b) = (doc.find(BEGIN).expect(BEGIN), doc.find(END).expect(END));
    let table = render();
    let current = doc[a + BEGIN.len()..b].trim();
    if std::env::var_os("SOVKMS_BLESS").is_some() {
        let new = format!("{}{BEGIN}\n{table}{}", &doc[..a], &doc[b..]);
        std::fs::write(&path, new).unwrap();
        return;
    }
    assert_eq!(
        current,
        table.trim(),
        "ARCHITECTURE.md's refusal table differs from what the code says; \
         rerun with SOVKMS_BLESS=1 after a deliberate change"
    );
}

#[test]
fn a_context_over_its_limits_is_refused_with_its_numbers() {
    // Contexts are parsed at the front end; the sentence still has one shape.
    assert_eq!(
        ContextError::Entries(65).to_string(),
        "encryption context has 65 entries; the limit is 64"
    );
}
