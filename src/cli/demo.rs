//! `sovkms demo`: the two-region scenario of the README's first command.
//!
//! Mints a development PKI, starts a throwaway PostgreSQL cluster and three
//! broker processes (two of eu-central over that database, one of us-east
//! on its embedded store), waits for them by gRPC health check, runs the
//! scenario, prints what happened, and stops everything. Exits non-zero if
//! any step did not give the expected answer.

use super::devenv::{
    connect_as, err, provision, softhsm_token, start_broker, wait_serving, Broker,
};
use super::CliError;
use crate::api::proto as pb;
use crate::client::{Code, RemoteError};
use crate::pki;
use crate::region::Region;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Arguments of `demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Working directory (PKI, tokens, configs, data, logs); wiped first.
    #[arg(long, default_value = ".quickstart")]
    dir: PathBuf,
    /// HSM profile of the SoftHSM2 tokens.
    #[arg(long, default_value = "softhsm2")]
    profile: String,
    /// Use the development software root instead of SoftHSM2 tokens.
    #[arg(long)]
    software_root: bool,
}

const TD: &str = "sovkms.example";

struct Row {
    caller: String,
    broker: String,
    op: String,
    expected: Code,
    got: Code,
    detail: String,
}

fn outcome<T>(r: &Result<T, RemoteError>) -> (Code, String) {
    match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(e) => (e.code, e.message.clone()),
    }
}

pub async fn run(a: DemoArgs) -> Result<(), CliError> {
    let exe = std::env::current_exe().map_err(err)?;
    let dir = a.dir;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(err)?;
    }
    std::fs::create_dir_all(&dir).map_err(err)?;
    let dir = dir.canonicalize().map_err(err)?;
    let pki_dir = dir.join("pki");
    let regions: Vec<Region> = ["eu-central", "us-east", "central"]
        .iter()
        .map(|r| Region::parse(r).map_err(err))
        .collect::<Result<_, _>>()?;
    outln!(
        "1. minting a development PKI (one CA per region) in {}",
        pki_dir.display()
    );
    pki::dev_pki(&pki_dir, TD, &regions, 2).map_err(err)?;

    let profile = super::devenv::profile_spec(&a.profile)?;
    let db = tokio::task::block_in_place(crate::store::cluster::ThrowawayCluster::start)
        .map_err(|e| CliError::new(e, "bash deploy/deps.sh installs PostgreSQL"))?;
    if a.software_root {
        outln!(
            "2. starting brokers with a DEVELOPMENT-ONLY software root per region: eu-central's two share a throwaway PostgreSQL on port {}, us-east has its embedded store",
            db.port()
        );
    } else {
        outln!("2. starting brokers, one SoftHSM2 token per region (private SOFTHSM2_CONF): eu-central's two share it and a throwaway PostgreSQL on port {}, us-east has its embedded store", db.port());
    }
    let mut brokers = HashMap::new();
    for r in &regions[..2] {
        let cfg = dir.join(format!("{r}.toml"));
        let (root, conf) = if a.software_root {
            (pki::DEV_SOFTWARE_ROOT.to_owned(), None)
        } else {
            let (root, conf) = softhsm_token(&exe, &dir, r, &profile)?;
            (root, Some(conf))
        };
        let mut text = pki::dev_broker_config(
            &pki_dir,
            &dir.join("data").join(r.as_str()),
            r,
            TD,
            &regions,
            &root,
        );
        // KMIP beside gRPC, with the region's service `app` allowed to
        // register keys of its own (as a database would).
        text.push_str(&format!(
            "\n[kmip]\nlisten = \"127.0.0.1:0\"\nkey_creators = [\"spiffe://{TD}/region/{r}/service/app\"]\n"
        ));
        // Metrics and health for the host's operators (loopback: plain HTTP).
        text.push_str("\n[admin]\nlisten = \"127.0.0.1:0\"\n");
        let eu = r.as_str() == "eu-central";
        if eu {
            // Several brokers of the region over its database.
            text = text.replace(
                "broker_id = \"eu-central-dev\"",
                "broker_id = \"eu-central-a\"",
            );
            text.push_str(&format!(
                "\n[store]\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\n",
                db.url(crate::store::cluster::ROLE),
                db.password_file().display()
            ));
        }
        std::fs::write(&cfg, &text).map_err(err)?;
        let root_desc = match &conf {
            Some(c) => format!(
                "root key in token 'sovkms-{r}', check value {}",
                provision(&exe, &cfg, c)?
            ),
            None => "software root (development only)".to_owned(),
        };
        let log = dir.join(format!("{r}.log"));
        let b = start_broker(&exe, &cfg, &log, conf.as_deref()).await?;
        outln!(
            "   {r:<11} broker on {} (KMIP {}, admin http://{}): {root_desc} (log: {})",
            b.addr,
            b.kmip_addr.as_deref().unwrap_or("off"),
            b.admin_addr.as_deref().unwrap_or("off"),
            log.display()
        );
        brokers.insert(r.to_string(), b);
        if eu {
            // The region's second broker: same root of trust, same database.
            let data_b = dir.join("data").join("eu-central-b");
            let text = text
                .replace(
                    "broker_id = \"eu-central-a\"",
                    "broker_id = \"eu-central-b\"",
                )
                .replace(
                    &format!(
                        "data_dir = \"{}\"",
                        dir.join("data").join("eu-central").display()
                    ),
                    &format!("data_dir = \"{}\"", data_b.display()),
                );
            if conf.is_none() {
                // The development root lives in the data directory: share it.
                std::fs::create_dir_all(&data_b).map_err(err)?;
                std::fs::copy(
                    dir.join("data")
                        .join("eu-central")
                        .join("software-root.key"),
                    data_b.join("software-root.key"),
                )
                .map_err(err)?;
            }
            let cfg_b = dir.join("eu-central-b.toml");
            std::fs::write(&cfg_b, text).map_err(err)?;
            let log = dir.join("eu-central-b.log");
            let b = start_broker(&exe, &cfg_b, &log, conf.as_deref()).await?;
            outln!(
                "   eu-central broker b on {} (the region's second broker: same token, same database; log: {})",
                b.addr,
                log.display()
            );
            brokers.insert("eu-central-b".to_owned(), b);
        }
    }
    let result = scenario(&pki_dir, &mut brokers).await;
    for (_, mut b) in brokers {
        let _ = b.child.start_kill();
        let _ = b.child.wait().await;
    }
    drop(db);
    outln!("5. brokers and the throwaway PostgreSQL stopped");
    result
}

async fn scenario(pki_dir: &Path, brokers: &mut HashMap<String, Broker>) -> Result<(), CliError> {
    let eu = &brokers["eu-central"].addr;
    let us = &brokers["us-east"].addr;
    for (region, addr) in [("eu-central", eu), ("us-east", us)] {
        wait_serving(
            &connect_as(pki_dir, &format!("{region}/operator-admin"), region, addr).await?,
        )
        .await?;
    }
    outln!("3. the brokers report SERVING (gRPC health)");

    let mut rows = Vec::new();
    let svc = |r: &str| format!("spiffe://{TD}/region/{r}/service/app");
    let mut op_eu = connect_as(pki_dir, "eu-central/operator-admin", "eu-central", eu).await?;
    let grants = vec![
        pb::Grant {
            principal: svc("eu-central"),
            operations: vec![
                pb::Operation::Encrypt as i32,
                pb::Operation::Decrypt as i32,
                pb::Operation::GenerateDataKey as i32,
            ],
        },
        pb::Grant {
            principal: svc("us-east"),
            operations: vec![pb::Operation::Encrypt as i32],
        },
        pb::Grant {
            principal: svc("central"),
            operations: vec![pb::Operation::Encrypt as i32],
        },
    ];
    let created = op_eu
        .create_key(pb::CreateKeyRequest {
            name: "patient-records".into(),
            tenant: "health".into(),
            description: "demo".into(),
            grants,
            activate: true,
        })
        .await;
    let (got, detail) = outcome(&created);
    let key_id = created.map(|r| r.key_id).unwrap_or_default();
    rows.push(Row {
        caller: "eu-central operator".into(),
        broker: "eu-central".into(),
        op: "create key".into(),
        expected: Code::Ok,
        got,
        detail: if detail.is_empty() {
            key_id.clone()
        } else {
            detail
        },
    });

    let ctx: HashMap<String, String> = [("record".to_string(), "patient-4711".to_string())].into();
    let secret = b"patient 4711: diagnosis stays in the EU".to_vec();
    let mut svc_eu = connect_as(pki_dir, "eu-central/service-app", "eu-central", eu).await?;
    let enc = svc_eu
        .encrypt(pb::EncryptRequest {
            key_id: key_id.clone(),
            plaintext: secret.clone(),
            context: ctx.clone(),
        })
        .await;
    let (got, detail) = outcome(&enc);
    let ct = enc.map(|r| r.ciphertext).unwrap_or_default();
    rows.push(Row {
        caller: "eu-central service".into(),
        broker: "eu-central".into(),
        op: "encrypt".into(),
        expected: Code::Ok,
        got,
        detail: if detail.is_empty() {
            format!("{} bytes of ciphertext", ct.len())
        } else {
            detail
        },
    });

    let dec = svc_eu
        .decrypt(pb::DecryptRequest {
            ciphertext: ct.clone(),
            context: ctx.clone(),
        })
        .await;
    let (mut got, detail) = outcome(&dec);
    let same = dec
        .map(|mut r| std::mem::take(&mut r.plaintext) == secret)
        .unwrap_or(false);
    if got == Code::Ok && !same {
        got = Code::DataLoss;
    }
    rows.push(Row {
        caller: "eu-central service".into(),
        broker: "eu-central".into(),
        op: "decrypt".into(),
        expected: Code::Ok,
        got,
        detail: if detail.is_empty() {
            "plaintext matches".into()
        } else {
            detail
        },
    });

    let mut central = connect_as(pki_dir, "central/service-app", "eu-central", eu).await?;
    let r = central
        .encrypt(pb::EncryptRequest {
            key_id: key_id.clone(),
            plaintext: b"aggregate input".to_vec(),
            context: ctx.clone(),
        })
        .await;
    let (got, detail) = outcome(&r);
    rows.push(Row {
        caller: "central plane".into(),
        broker: "eu-central".into(),
        op: "encrypt (into the region)".into(),
        expected: Code::Ok,
        got,
        detail: if detail.is_empty() {
            "allowed by the key's grant".into()
        } else {
            detail
        },
    });

    let refusals: [(&str, &str, &str, Code); 4] = [
        (
            "us-east/service-app",
            "us-east service",
            "eu-central",
            Code::PermissionDenied,
        ),
        (
            "central/service-app",
            "central plane",
            "eu-central",
            Code::PermissionDenied,
        ),
        (
            "eu-central/operator-admin",
            "eu-central operator",
            "eu-central",
            Code::PermissionDenied,
        ),
        (
            "us-east/service-app",
            "us-east service",
            "us-east",
            Code::FailedPrecondition,
        ),
    ];
    for (who, label, broker, expected) in refusals {
        let addr = if broker == "eu-central" { eu } else { us };
        let mut c = connect_as(pki_dir, who, broker, addr).await?;
        let r = c
            .decrypt(pb::DecryptRequest {
                ciphertext: ct.clone(),
                context: ctx.clone(),
            })
            .await;
        let (got, detail) = outcome(&r);
        rows.push(Row {
            caller: label.into(),
            broker: broker.into(),
            op: "decrypt".into(),
            expected,
            got,
            detail,
        });
    }
    let wrong_ctx: HashMap<String, String> =
        [("record".to_string(), "patient-4712".to_string())].into();
    let r = svc_eu
        .decrypt(pb::DecryptRequest {
            ciphertext: ct.clone(),
            context: wrong_ctx,
        })
        .await;
    let (got, detail) = outcome(&r);
    rows.push(Row {
        caller: "eu-central service".into(),
        broker: "eu-central".into(),
        op: "decrypt, wrong context".into(),
        expected: Code::InvalidArgument,
        got,
        detail,
    });

    ha_steps(pki_dir, brokers, &ct, &ctx, &mut rows).await?;
    file_steps(pki_dir, brokers, &key_id, &mut rows).await?;
    kmip_steps(pki_dir, brokers, &mut rows).await?;

    outln!("4. scenario:\n");
    print_table(&rows);
    let failed = rows.iter().filter(|r| r.got != r.expected).count();
    if failed > 0 {
        return Err(CliError::new(
            format!("{failed} step(s) did not give the expected answer"),
            "see the table and the broker logs",
        ));
    }
    outln!(
        "\nall {} steps gave the expected answer: plaintext stayed in eu-central.",
        rows.len()
    );
    admin_view(&brokers["eu-central"]).await
}

/// The region's second broker: it serves keys and ciphertext made through
/// the first (one database), refuses other regions the same way, and a
/// client that lists both carries on when one stops.
async fn ha_steps(
    pki_dir: &Path,
    brokers: &mut HashMap<String, Broker>,
    ct: &[u8],
    ctx: &HashMap<String, String>,
    rows: &mut Vec<Row>,
) -> Result<(), CliError> {
    let (a, b) = (
        brokers["eu-central"].addr.clone(),
        brokers["eu-central-b"].addr.clone(),
    );
    wait_serving(&connect_as(pki_dir, "eu-central/operator-admin", "eu-central", &b).await?)
        .await?;
    for (who, label, expected) in [
        ("eu-central/service-app", "eu-central service", Code::Ok),
        (
            "us-east/service-app",
            "us-east service",
            Code::PermissionDenied,
        ),
    ] {
        let mut c = connect_as(pki_dir, who, "eu-central", &b).await?;
        let r = c
            .decrypt(pb::DecryptRequest {
                ciphertext: ct.to_vec(),
                context: ctx.clone(),
            })
            .await;
        let (got, detail) = outcome(&r);
        rows.push(Row {
            caller: label.into(),
            broker: "eu-central (b)".into(),
            op: "decrypt, made through a".into(),
            expected,
            got,
            detail: if detail.is_empty() {
                "same database, same root".into()
            } else {
                detail
            },
        });
    }
    let tls = |addr: &str| -> Result<crate::client::Endpoint, CliError> {
        let t = crate::client::ClientTls::from_files(
            &pki_dir.join("eu-central").join("ca.pem"),
            &pki_dir.join("eu-central").join("service-app.pem"),
            &pki_dir.join("eu-central").join("service-app.key"),
            "localhost",
        )
        .map_err(err)?;
        Ok(crate::client::Endpoint::new("eu-central", addr, t))
    };
    let regional = crate::client::Regional::new(vec![tls(&b)?, tls(&a)?]).map_err(err)?;
    if let Some(broker_b) = brokers.get_mut("eu-central-b") {
        let _ = broker_b.child.start_kill();
        let _ = broker_b.child.wait().await;
    }
    let r = regional.decrypt(ct, ctx.clone()).await;
    let (got, detail) = match &r {
        Ok(_) => (Code::Ok, "broker b stopped: served by a".to_owned()),
        Err(e) => (Code::Unavailable, e.to_string()),
    };
    rows.push(Row {
        caller: "eu-central service".into(),
        broker: "eu-central (b, a)".into(),
        op: "decrypt, b killed".into(),
        expected: Code::Ok,
        got,
        detail,
    });
    Ok(())
}

/// What the region's operators see on the admin listener: readiness and
/// the request counters of the scenario.
async fn admin_view(b: &Broker) -> Result<(), CliError> {
    let Some(admin) = &b.admin_addr else {
        return Ok(());
    };
    let (status, ready) = super::devenv::admin_get(admin, "/readyz").await?;
    outln!(
        "\neu-central admin listener: /readyz {status} {}",
        ready.trim()
    );
    let (_, metrics) = super::devenv::admin_get(admin, "/metrics").await?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("sovkms_requests_total{operation=\"decrypt\"")
            || l.starts_with("sovkms_refusals_total")
    }) {
        outln!("   {line}");
    }
    if status != 200 {
        return Err(CliError::new(
            format!("the eu-central broker is not ready: {}", ready.trim()),
            "see its log",
        ));
    }
    Ok(())
}

/// A file, as `sovkms file` seals it: a data key from the eu-central
/// broker, 1 MiB sealed locally; the data key unwraps in eu-central and is
/// refused to us-east, so the file opens only in its region.
async fn file_steps(
    pki_dir: &Path,
    brokers: &HashMap<String, Broker>,
    key_id: &str,
    rows: &mut Vec<Row>,
) -> Result<(), CliError> {
    use crate::file::{open, seal, Header};
    use crate::secret::KeyMaterial;
    let eu = &brokers["eu-central"].addr;
    let mut svc_eu = connect_as(pki_dir, "eu-central/service-app", "eu-central", eu).await?;
    let mut svc_us = connect_as(pki_dir, "us-east/service-app", "eu-central", eu).await?;
    let context: HashMap<String, String> = [("file".to_string(), "scan-0001".to_string())].into();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let dk = svc_eu
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: key_id.to_owned(),
            context: context.clone(),
        })
        .await;
    let (got, detail) = outcome(&dk);
    let mut sealed = Vec::new();
    if let Ok(mut r) = dk {
        let key = KeyMaterial::from_slice(&r.plaintext_key).ok_or_else(|| err("data key"))?;
        zeroize::Zeroize::zeroize(&mut r.plaintext_key);
        let header =
            Header::new("eu-central", key_id, std::mem::take(&mut r.wrapped_key)).map_err(err)?;
        seal(
            &header,
            &key,
            &mut &data[..],
            &mut sealed,
            &mut |_| {},
            crate::file::default_threads(),
        )
        .map_err(err)?;
    }
    rows.push(Row {
        caller: "eu-central service".into(),
        broker: "eu-central".into(),
        op: "file encrypt (1 MiB)".into(),
        expected: Code::Ok,
        got,
        detail: if detail.is_empty() {
            format!("{} bytes, sealed locally", sealed.len())
        } else {
            detail
        },
    });
    let mut input = &sealed[..];
    let header = Header::read(&mut input).map_err(err)?;
    for (who, c, expected) in [
        ("eu-central service", &mut svc_eu, Code::Ok),
        ("us-east service", &mut svc_us, Code::PermissionDenied),
    ] {
        let r = c
            .decrypt(pb::DecryptRequest {
                ciphertext: header.wrapped_key.clone(),
                context: context.clone(),
            })
            .await;
        let (got, mut detail) = outcome(&r);
        if let Ok(mut d) = r {
            let key = KeyMaterial::from_slice(&d.plaintext).ok_or_else(|| err("data key"))?;
            zeroize::Zeroize::zeroize(&mut d.plaintext);
            let mut out = Vec::new();
            open(
                &header,
                &key,
                &mut &input[..],
                &mut out,
                &mut |_| {},
                crate::file::default_threads(),
            )
            .map_err(err)?;
            detail = if out == data {
                "file matches".into()
            } else {
                "FILE DIFFERS".into()
            };
        }
        rows.push(Row {
            caller: who.into(),
            broker: "eu-central".into(),
            op: "file decrypt".into(),
            expected,
            got,
            detail,
        });
    }
    Ok(())
}

/// KMIP, as a database uses it: register a key with a name, fetch it back
/// in the region; other regions and the central plane are refused.
async fn kmip_steps(
    pki_dir: &Path,
    brokers: &HashMap<String, Broker>,
    rows: &mut Vec<Row>,
) -> Result<(), CliError> {
    use crate::kmip::client::{client_config, outcomes, request, KmipClient};
    use crate::kmip::message::Version;
    use crate::kmip::tag::{self, op};
    use crate::kmip::ttlv::Item;
    let addr = brokers["eu-central"]
        .kmip_addr
        .clone()
        .ok_or_else(|| err("the eu-central broker reported no KMIP address"))?;
    let v = Version { major: 1, minor: 4 };
    let key: Vec<u8> = (0u8..32).collect();
    let call = |who: &'static str, req: Item| {
        let addr = addr.clone();
        async move {
            let (region, stem) = who.split_once('/').unwrap_or((who, who));
            let tls = crate::client::ClientTls::from_files(
                &pki_dir.join("eu-central").join("ca.pem"),
                &pki_dir.join(region).join(format!("{stem}.pem")),
                &pki_dir.join(region).join(format!("{stem}.key")),
                "localhost",
            )
            .map_err(err)?;
            let cfg = client_config(&tls, false).map_err(err)?;
            let mut c = KmipClient::connect(&addr, cfg, "localhost")
                .await
                .map_err(err)?;
            let resp = c.call(&req).await.map_err(err)?;
            outcomes(&resp)
                .into_iter()
                .next()
                .ok_or_else(|| err("a KMIP response without a batch item"))
        }
    };
    let code = |o: &crate::kmip::client::Outcome| match (o.status, o.reason) {
        (0, _) => Code::Ok,
        (_, Some(tag::reason::PERMISSION_DENIED)) => Code::PermissionDenied,
        _ => Code::Unknown,
    };
    let register = request(
        v,
        vec![(
            op::REGISTER,
            crate::kmip::client::register_aes_payload(&key),
        )],
    );
    let o = call("eu-central/service-app", register).await?;
    let id = o
        .text(tag::UNIQUE_IDENTIFIER)
        .unwrap_or_default()
        .to_owned();
    rows.push(Row {
        caller: "eu-central service".into(),
        broker: "eu-central".into(),
        op: "KMIP register key".into(),
        expected: Code::Ok,
        got: code(&o),
        detail: o.message.clone().unwrap_or_else(|| id.clone()),
    });
    let get = || {
        request(
            v,
            vec![(
                op::GET,
                vec![Item::text(tag::UNIQUE_IDENTIFIER, id.clone())],
            )],
        )
    };
    let o = call("eu-central/service-app", get()).await?;
    let fetched = o
        .field(tag::SYMMETRIC_KEY)
        .and_then(|k| k.children().first())
        .and_then(|b| b.children().iter().find(|i| i.tag == tag::KEY_VALUE))
        .and_then(|kv| kv.children().first())
        .is_some_and(|m| m.value == Item::bytes(tag::KEY_MATERIAL, key.clone()).value);
    let mut got = code(&o);
    if got == Code::Ok && !fetched {
        got = Code::DataLoss;
    }
    rows.push(Row {
        caller: "eu-central service".into(),
        broker: "eu-central".into(),
        op: "KMIP get".into(),
        expected: Code::Ok,
        got,
        detail: o
            .message
            .clone()
            .unwrap_or_else(|| "key material matches".into()),
    });
    for (who, label) in [
        ("us-east/service-app", "us-east service"),
        ("central/service-app", "central plane"),
    ] {
        let o = call(who, get()).await?;
        rows.push(Row {
            caller: label.into(),
            broker: "eu-central".into(),
            op: "KMIP get".into(),
            expected: Code::PermissionDenied,
            got: code(&o),
            detail: o.message.unwrap_or_default(),
        });
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    outln!(
        "#   {:<20} {:<17} {:<26} {:<20} DETAIL",
        "CALLER",
        "BROKER",
        "OPERATION",
        "RESULT"
    );
    for (i, r) in rows.iter().enumerate() {
        let mark = if r.got == r.expected {
            ""
        } else {
            " (UNEXPECTED)"
        };
        outln!(
            "{:<3} {:<20} {:<17} {:<26} {:<20} {}{mark}",
            i + 1,
            r.caller,
            r.broker,
            r.op,
            r.got.name(),
            r.detail
        );
    }
}
