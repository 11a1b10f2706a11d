//! The table of operations: who may call each, whether it is bound to the
//! region, which grant it needs and which key states allow it. Read by the
//! one gate (`broker/gate.rs`); a new operation is a new row here.

use super::CryptoOp;
use crate::id::KeyState;
use crate::region::Role;
use std::fmt;

/// Every operation a caller can ask of the core (the audit log's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// Encrypt under a key.
    Encrypt,
    /// Decrypt a ciphertext.
    Decrypt,
    /// A data key, in the clear and wrapped.
    GenerateDataKey,
    /// A data key, wrapped only.
    GenerateDataKeyWithoutPlaintext,
    /// Decrypt and encrypt again inside the broker.
    ReEncrypt,
    /// Create a key.
    CreateKey,
    /// Pre-active → active.
    ActivateKey,
    /// Deactivate or mark compromised.
    RevokeKey,
    /// Schedule destruction.
    ScheduleKeyDestruction,
    /// Cancel a scheduled destruction.
    CancelKeyDestruction,
    /// Add a version.
    Rekey,
    /// Replace a key's grants.
    SetGrants,
    /// Read one key's attributes.
    GetAttributes,
    /// List keys.
    Locate,
    /// Broker facts.
    GetInfo,
    /// Ask for a break-glass grant.
    RequestBreakGlass,
    /// Approve one.
    ApproveBreakGlass,
    /// Withdraw one.
    RevokeBreakGlass,
    /// List them.
    ListBreakGlass,
    /// Raw audit records.
    ExportAuditRecords,
    /// Counts of audit records.
    ReadAuditAggregates,
    /// A TPM quote.
    Attest,
    /// The end of a destroy window (the broker itself, no caller).
    DestroyKey,
    /// A service creates or registers a key it will own (KMIP Create and
    /// Register by a principal named in `[kmip] key_creators`).
    CreateOwnKey,
    /// A key's material itself (KMIP Get).
    ExportKey,
    /// Change a key's descriptive attributes (name, custom attributes).
    SetAttributes,
}

impl Operation {
    /// Every operation, in table order.
    pub const ALL: [Operation; 26] = [
        Self::Encrypt,
        Self::Decrypt,
        Self::GenerateDataKey,
        Self::GenerateDataKeyWithoutPlaintext,
        Self::ReEncrypt,
        Self::CreateKey,
        Self::ActivateKey,
        Self::RevokeKey,
        Self::ScheduleKeyDestruction,
        Self::CancelKeyDestruction,
        Self::Rekey,
        Self::SetGrants,
        Self::GetAttributes,
        Self::Locate,
        Self::GetInfo,
        Self::RequestBreakGlass,
        Self::ApproveBreakGlass,
        Self::RevokeBreakGlass,
        Self::ListBreakGlass,
        Self::ExportAuditRecords,
        Self::ReadAuditAggregates,
        Self::Attest,
        Self::DestroyKey,
        Self::CreateOwnKey,
        Self::ExportKey,
        Self::SetAttributes,
    ];

    /// The name in audit records.
    pub fn name(self) -> &'static str {
        self.rule().name
    }

    /// What the operation does, as a verb phrase that completes "may not …"
    /// and "has no grant to …".
    pub fn action(self) -> &'static str {
        self.rule().action
    }

    /// Its row of the table.
    pub fn rule(self) -> &'static Rule {
        // RULES holds one row per operation, in `ALL` order (a test checks it).
        &RULES[self as usize]
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a caller may be for an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Any region (the key's grants still decide).
    Anywhere,
    /// Callers of the broker's region only.
    InRegion,
    /// The residency rule: caller region = broker region = the data's home
    /// region. For everything that releases or processes plaintext.
    Resident,
}

/// What the operation is for; it decides the reason given to a wrong role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Duty {
    /// Cryptography: services, per grants.
    Crypto,
    /// Key and break-glass management: operators.
    Manage,
    /// Reading keys and grants: operators and auditors.
    Read,
    /// Raw audit records and aggregates: auditors.
    Audit,
    /// TPM quotes: auditors.
    Attest,
    /// Broker facts: anyone authenticated.
    Inform,
    /// Done by the broker itself.
    Internal,
}

/// One row of the table.
#[derive(Debug)]
pub struct Rule {
    /// The operation.
    pub op: Operation,
    /// Name in audit records.
    pub name: &'static str,
    /// Verb phrase for refusals.
    pub action: &'static str,
    /// What it is for.
    pub duty: Duty,
    /// Roles that may call it.
    pub roles: &'static [Role],
    /// Where callers may be.
    pub reach: Reach,
    /// The grant it needs on the key, if it names one.
    pub grant: Option<CryptoOp>,
    /// Key states that allow it (for crypto, the source key).
    pub states: &'static [KeyState],
    /// Principals named in `[audit] aggregate_readers` may also call it,
    /// from any region.
    pub named_readers: bool,
    /// True when the answer carries plaintext or key material (its audit
    /// record is durable before the answer leaves).
    pub releases_plaintext: bool,
    /// A service holding this grant on the key may also call it: a key's
    /// owner managing that one key (operators manage every key by role).
    pub service_grant: Option<CryptoOp>,
    /// Only principals named in `[kmip] key_creators` may call it.
    pub creators_only: bool,
}

use KeyState::{Active, Compromised, Deactivated, Destroyed, PreActive};
const SERVICE: &[Role] = &[Role::Service];
const OPERATOR: &[Role] = &[Role::Operator];
const AUDITOR: &[Role] = &[Role::Auditor];
const READERS: &[Role] = &[Role::Operator, Role::Auditor];
const EVERYONE: &[Role] = &[Role::Service, Role::Operator, Role::Auditor];
const NO_ONE: &[Role] = &[];
const ACTIVE: &[KeyState] = &[Active];
const OPENS: &[KeyState] = &[Active, Deactivated];
const MOVES_AWAY: &[KeyState] = &[Active, Deactivated, Compromised];
const CHANGEABLE: &[KeyState] = &[PreActive, Active, Deactivated, Compromised];
const ANY_STATE: &[KeyState] = &[PreActive, Active, Deactivated, Compromised, Destroyed];

const fn row(
    op: Operation,
    name: &'static str,
    action: &'static str,
    duty: Duty,
    roles: &'static [Role],
    reach: Reach,
) -> Rule {
    Rule {
        op,
        name,
        action,
        duty,
        roles,
        reach,
        grant: None,
        states: ANY_STATE,
        named_readers: false,
        releases_plaintext: false,
        service_grant: None,
        creators_only: false,
    }
}

const fn crypto(
    op: Operation,
    name: &'static str,
    action: &'static str,
    reach: Reach,
    grant: CryptoOp,
    states: &'static [KeyState],
) -> Rule {
    Rule {
        grant: Some(grant),
        states,
        releases_plaintext: matches!(reach, Reach::Resident),
        ..row(op, name, action, Duty::Crypto, SERVICE, reach)
    }
}

const fn manage(op: Operation, name: &'static str, action: &'static str) -> Rule {
    Rule {
        states: CHANGEABLE,
        ..row(op, name, action, Duty::Manage, OPERATOR, Reach::InRegion)
    }
}

/// A management row that a key's owning service may also call on that key.
const fn owned(op: Operation, name: &'static str, action: &'static str) -> Rule {
    Rule {
        service_grant: Some(CryptoOp::Manage),
        ..manage(op, name, action)
    }
}

use Operation as O;
use Reach::{Anywhere, InRegion, Resident};

/// The table, one row per [`Operation`] in [`Operation::ALL`] order.
pub static RULES: [Rule; 26] = [
    crypto(
        O::Encrypt,
        "encrypt",
        "encrypt",
        Anywhere,
        CryptoOp::Encrypt,
        ACTIVE,
    ),
    crypto(
        O::Decrypt,
        "decrypt",
        "decrypt",
        Resident,
        CryptoOp::Decrypt,
        OPENS,
    ),
    crypto(
        O::GenerateDataKey,
        "generate-data-key",
        "generate data keys",
        Resident,
        CryptoOp::GenerateDataKey,
        ACTIVE,
    ),
    crypto(
        O::GenerateDataKeyWithoutPlaintext,
        "generate-data-key-without-plaintext",
        "generate wrapped data keys",
        Anywhere,
        CryptoOp::GenerateDataKeyWithoutPlaintext,
        ACTIVE,
    ),
    crypto(
        O::ReEncrypt,
        "re-encrypt",
        "re-encrypt",
        Resident,
        CryptoOp::ReEncrypt,
        MOVES_AWAY,
    ),
    Rule {
        states: ANY_STATE,
        ..manage(O::CreateKey, "create-key", "create keys")
    },
    owned(O::ActivateKey, "activate-key", "activate keys"),
    owned(O::RevokeKey, "revoke-key", "revoke keys"),
    owned(
        O::ScheduleKeyDestruction,
        "schedule-key-destruction",
        "destroy keys",
    ),
    owned(
        O::CancelKeyDestruction,
        "cancel-key-destruction",
        "cancel key destruction",
    ),
    owned(O::Rekey, "rekey", "rekey keys"),
    manage(O::SetGrants, "set-grants", "change key grants"),
    Rule {
        service_grant: Some(CryptoOp::Manage),
        ..row(
            O::GetAttributes,
            "get-attributes",
            "read key attributes",
            Duty::Read,
            READERS,
            InRegion,
        )
    },
    // Services locate too (to find a key by name), but see only the keys
    // whose grants name them (`Broker::locate`).
    row(
        O::Locate,
        "locate",
        "locate keys",
        Duty::Read,
        EVERYONE,
        InRegion,
    ),
    row(
        O::GetInfo,
        "get-info",
        "read broker information",
        Duty::Inform,
        EVERYONE,
        Anywhere,
    ),
    Rule {
        states: ANY_STATE,
        ..manage(
            O::RequestBreakGlass,
            "request-break-glass",
            "request break-glass grants",
        )
    },
    Rule {
        states: ANY_STATE,
        ..manage(
            O::ApproveBreakGlass,
            "approve-break-glass",
            "approve break-glass grants",
        )
    },
    Rule {
        states: ANY_STATE,
        ..manage(
            O::RevokeBreakGlass,
            "revoke-break-glass",
            "revoke break-glass grants",
        )
    },
    row(
        O::ListBreakGlass,
        "list-break-glass",
        "list break-glass grants",
        Duty::Read,
        READERS,
        InRegion,
    ),
    row(
        O::ExportAuditRecords,
        "export-audit-records",
        "read audit records",
        Duty::Audit,
        AUDITOR,
        InRegion,
    ),
    Rule {
        named_readers: true,
        ..row(
            O::ReadAuditAggregates,
            "read-audit-aggregates",
            "read audit aggregates",
            Duty::Audit,
            AUDITOR,
            InRegion,
        )
    },
    row(
        O::Attest,
        "attest",
        "request TPM quotes",
        Duty::Attest,
        AUDITOR,
        InRegion,
    ),
    row(
        O::DestroyKey,
        "destroy-key",
        "destroy keys",
        Duty::Internal,
        NO_ONE,
        InRegion,
    ),
    Rule {
        creators_only: true,
        ..row(
            O::CreateOwnKey,
            "create-own-key",
            "create keys of their own",
            Duty::Manage,
            SERVICE,
            InRegion,
        )
    },
    // KMIP clients fetch a registered key before anyone activates it
    // (pg_tde registers, then gets): export works in every state but
    // destroyed, as KMIP's Get does; only keys that may be exported.
    crypto(
        O::ExportKey,
        "export-key",
        "export key material",
        Resident,
        CryptoOp::Export,
        CHANGEABLE,
    ),
    owned(O::SetAttributes, "set-attributes", "change key attributes"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_row_per_operation_in_order_with_unique_names() {
        let mut names = std::collections::HashSet::new();
        for (i, op) in Operation::ALL.iter().enumerate() {
            assert_eq!(RULES[i].op, *op, "row {i}");
            assert!(names.insert(op.name()), "{op:?}");
        }
    }

    /// The residency rule as the product states it, checked against the
    /// table rather than restated by it.
    #[test]
    fn what_releases_plaintext_is_resident_and_for_services_only() {
        for r in &RULES {
            let by_grant = r.grant.is_some_and(|g| g.is_residency_bound());
            assert_eq!(by_grant, r.reach == Reach::Resident, "{:?}", r.op);
            assert_eq!(
                r.releases_plaintext,
                r.reach == Reach::Resident,
                "{:?}",
                r.op
            );
            if r.releases_plaintext {
                assert_eq!(r.roles, SERVICE, "{:?}", r.op);
                assert!(!r.named_readers, "{:?}", r.op);
            }
            if r.grant.is_some() {
                assert_eq!(r.duty, Duty::Crypto);
                assert!(!r.states.contains(&Destroyed));
                // Only the key's material may leave before activation.
                assert!(!r.states.contains(&PreActive) || r.op == Operation::ExportKey);
            }
            if let Some(g) = r.service_grant {
                assert!(
                    g.is_in_region_only() && r.reach != Reach::Anywhere,
                    "{:?}",
                    r.op
                );
                assert!(!r.releases_plaintext, "{:?}", r.op);
            }
            if r.roles.contains(&Role::Operator) && r.duty != Duty::Inform {
                assert_ne!(r.reach, Reach::Anywhere, "{:?}", r.op);
            }
        }
    }
}
