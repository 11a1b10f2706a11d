//! The KMIP front end over real mutual TLS on 127.0.0.1 against a broker on
//! a real SoftHSM2 token: the request sequences of real clients encoded by
//! our own encoder and checked field by field, the region rule on every
//! path that releases key material or plaintext, and malformed input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use sovkms::kmip::client::{client_config, outcomes, request, KmipClient, Outcome};
use sovkms::kmip::message::Version;
use sovkms::kmip::tag::{self, op, reason};
use sovkms::kmip::ttlv::{Item, Value};
use std::sync::Arc;

const V1_0: Version = Version { major: 1, minor: 0 };
const V1_4: Version = Version { major: 1, minor: 4 };
const V2_0: Version = Version { major: 2, minor: 0 };

/// A broker of `r` with KMIP on a free port and `eu-central/service/app`
/// allowed to create keys of its own.
async fn kmip_broker(env: &Env, r: &str) -> (TestBroker, String) {
    let tail = format!(
        "\n[kmip]\nlisten = \"127.0.0.1:0\"\nkey_creators = [\"{}\"]\n",
        spiffe("eu-central", "service", "app")
    );
    let b = start_broker_from(env, r, &env.config_with_tail(r, &tail)).await;
    let addr = b.server.kmip_addr.expect("KMIP listener").to_string();
    (b, addr)
}

async fn connect(env: &Env, who: &str, broker_region: &str, addr: &str) -> KmipClient {
    let cfg = client_config(&env.tls(who, broker_region), false).unwrap();
    KmipClient::connect(addr, cfg, "localhost").await.unwrap()
}

/// One request on a new connection (pg_tde's pattern).
async fn once(
    env: &Env,
    who: &str,
    addr: &str,
    version: Version,
    operation: u32,
    payload: Vec<Item>,
) -> Outcome {
    let mut c = connect(env, who, "eu-central", addr).await;
    let resp = c
        .call(&request(version, vec![(operation, payload)]))
        .await
        .unwrap();
    check_header(&resp, version, 1);
    let mut o = outcomes(&resp);
    assert_eq!(o.len(), 1);
    o.remove(0)
}

/// The response header holds exactly Protocol Version (the request's),
/// Time Stamp and Batch Count, in that order.
fn check_header(resp: &Item, version: Version, count: i32) {
    assert_eq!(resp.tag, tag::RESPONSE_MESSAGE);
    let h = &resp.children()[0];
    assert_eq!(h.tag, tag::RESPONSE_HEADER);
    let tags: Vec<u32> = h.children().iter().map(|i| i.tag).collect();
    assert_eq!(
        tags,
        [tag::PROTOCOL_VERSION, tag::TIME_STAMP, tag::BATCH_COUNT]
    );
    assert_eq!(h.children()[0], version.item());
    assert_eq!(h.children()[2], Item::integer(tag::BATCH_COUNT, count));
}

fn attr(name: &str, value: Value) -> Item {
    Item::structure(
        tag::ATTRIBUTE,
        vec![
            Item::text(tag::ATTRIBUTE_NAME, name),
            Item::new(tag::ATTRIBUTE_VALUE, value),
        ],
    )
}

fn name_value(n: &str) -> Value {
    Value::Structure(vec![
        Item::text(tag::NAME_VALUE, n),
        Item::enumeration(tag::NAME_TYPE, 1),
    ])
}

fn uid(id: &str) -> Item {
    Item::text(tag::UNIQUE_IDENTIFIER, id)
}

/// pg_tde's Register: a 1.x Template-Attribute (algorithm, length, usage
/// mask, name) and the key in Raw format.
fn register_payload(name: &str, key: &[u8]) -> Vec<Item> {
    vec![
        Item::enumeration(tag::OBJECT_TYPE, tag::object_type::SYMMETRIC_KEY),
        Item::structure(
            tag::TEMPLATE_ATTRIBUTE,
            vec![
                attr("Cryptographic Algorithm", Value::Enumeration(tag::alg::AES)),
                attr(
                    "Cryptographic Length",
                    Value::Integer(i32::try_from(key.len() * 8).unwrap()),
                ),
                attr(
                    "Cryptographic Usage Mask",
                    Value::Integer(tag::usage::ENCRYPT | tag::usage::DECRYPT),
                ),
                attr("Name", name_value(name)),
            ],
        ),
        Item::structure(
            tag::SYMMETRIC_KEY,
            vec![Item::structure(
                tag::KEY_BLOCK,
                vec![
                    Item::enumeration(tag::KEY_FORMAT_TYPE, tag::format::RAW),
                    Item::structure(
                        tag::KEY_VALUE,
                        vec![Item::bytes(tag::KEY_MATERIAL, key.to_vec())],
                    ),
                    Item::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, tag::alg::AES),
                    Item::integer(
                        tag::CRYPTOGRAPHIC_LENGTH,
                        i32::try_from(key.len() * 8).unwrap(),
                    ),
                ],
            )],
        ),
    ]
}

fn locate_by_name(name: &str) -> Vec<Item> {
    vec![
        Item::integer(tag::MAXIMUM_ITEMS, 16),
        attr(
            "Object Type",
            Value::Enumeration(tag::object_type::SYMMETRIC_KEY),
        ),
        attr("Name", name_value(name)),
    ]
}

fn ids(o: &Outcome) -> Vec<String> {
    o.payload
        .iter()
        .filter(|i| i.tag == tag::UNIQUE_IDENTIFIER)
        .map(|i| match &i.value {
            Value::Text(s) => s.clone(),
            v => panic!("{v:?}"),
        })
        .collect()
}

fn key_material(o: &Outcome) -> Vec<u8> {
    let sk = o.field(tag::SYMMETRIC_KEY).expect("Symmetric Key");
    let kb = &sk.children()[0];
    let kv = kb
        .children()
        .iter()
        .find(|i| i.tag == tag::KEY_VALUE)
        .unwrap();
    match &kv.children()[0].value {
        Value::Bytes(b) => b.to_vec(),
        v => panic!("{v:?}"),
    }
}

fn assert_failed(o: &Outcome, want: u32, text: &str) {
    assert_eq!(o.status, tag::status::OPERATION_FAILED, "{o:?}");
    assert_eq!(o.reason, Some(want), "{o:?}");
    let m = o.message.as_deref().unwrap_or_default();
    assert!(m.contains(text), "{m:?} lacks {text:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pg_tde_sequence_register_locate_get() {
    let env = Env::new();
    let (b, addr) = kmip_broker(&env, "eu-central").await;
    let app = "eu-central/service-app";
    let key: Vec<u8> = (0u8..16).collect();
    // Register under 1.4, each operation on its own connection.
    let r = once(
        &env,
        app,
        &addr,
        V1_4,
        op::REGISTER,
        register_payload("pg_tde_principal_1", &key),
    )
    .await;
    assert_eq!(r.status, tag::status::SUCCESS, "{r:?}");
    let id = r.text(tag::UNIQUE_IDENTIFIER).unwrap().to_owned();
    // The same name again is refused: a client finding its key by name
    // must get exactly one.
    let again = once(
        &env,
        app,
        &addr,
        V1_4,
        op::REGISTER,
        register_payload("pg_tde_principal_1", &key),
    )
    .await;
    assert_failed(&again, reason::ILLEGAL_OPERATION, "already exists");
    // Locate and Get under 1.0.
    let l = once(
        &env,
        app,
        &addr,
        V1_0,
        op::LOCATE,
        locate_by_name("pg_tde_principal_1"),
    )
    .await;
    assert_eq!(ids(&l), std::slice::from_ref(&id));
    assert!(
        l.field(tag::LOCATED_ITEMS).is_none(),
        "1.0 defines no Located Items"
    );
    let g = once(&env, app, &addr, V1_0, op::GET, vec![uid(&id)]).await;
    assert_eq!(g.status, tag::status::SUCCESS, "{g:?}");
    assert_eq!(key_material(&g), key);
    assert_eq!(
        g.field(tag::OBJECT_TYPE).unwrap().value,
        Value::Enumeration(tag::object_type::SYMMETRIC_KEY)
    );
    // Audited in the one chain, with KMIP's names; the Get durably.
    let recs = read_records(&b.audit_path);
    let get = recs
        .iter()
        .find(|r| r.operation == "Get" && r.outcome == "allowed")
        .expect("Get record");
    assert_eq!(get.protocol, "kmip");
    assert_eq!(get.key_id, id);
    assert_eq!(get.caller, spiffe("eu-central", "service", "app"));
    assert!(recs
        .iter()
        .any(|r| r.operation == "Register" && r.protocol == "kmip"));
    b.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn key_material_and_plaintext_stay_in_the_region() {
    let env = Env::new();
    let (b, addr) = kmip_broker(&env, "eu-central").await;
    let app = "eu-central/service-app";
    let key = [7u8; 32];
    let r = once(
        &env,
        app,
        &addr,
        V1_4,
        op::REGISTER,
        register_payload("payments", &key),
    )
    .await;
    let id = r.text(tag::UNIQUE_IDENTIFIER).unwrap().to_owned();
    let a = once(&env, app, &addr, V1_4, op::ACTIVATE, vec![uid(&id)]).await;
    assert_eq!(a.status, tag::status::SUCCESS, "{a:?}");
    let e = once(
        &env,
        app,
        &addr,
        V1_4,
        op::ENCRYPT,
        vec![uid(&id), Item::bytes(tag::DATA, b"card 4111".to_vec())],
    )
    .await;
    assert_eq!(e.status, tag::status::SUCCESS, "{e:?}");
    let decrypt = |who: &'static str| {
        let payload = vec![
            uid(&id),
            Item::bytes(tag::DATA, e.bytes(tag::DATA).unwrap().to_vec()),
            Item::bytes(
                tag::IV_COUNTER_NONCE,
                e.bytes(tag::IV_COUNTER_NONCE).unwrap().to_vec(),
            ),
            Item::bytes(
                tag::AUTHENTICATED_ENCRYPTION_TAG,
                e.bytes(tag::AUTHENTICATED_ENCRYPTION_TAG).unwrap().to_vec(),
            ),
        ];
        let (env, addr) = (&env, addr.clone());
        async move { once(env, who, &addr, V1_4, op::DECRYPT, payload).await }
    };
    let ok = decrypt(app).await;
    assert_eq!(ok.bytes(tag::DATA).unwrap(), b"card 4111");
    // Other regions and the central plane: refused with the core's sentence.
    for who in ["us-east/service-app", "central/service-app"] {
        let region = who.split('/').next().unwrap();
        let d = decrypt(who).await;
        assert_failed(
            &d,
            reason::PERMISSION_DENIED,
            &format!("caller region {region} may not decrypt"),
        );
        let g = once(&env, who, &addr, V1_4, op::GET, vec![uid(&id)]).await;
        assert_failed(
            &g,
            reason::PERMISSION_DENIED,
            &format!("caller region {region} may not export key material"),
        );
        assert!(g.field(tag::SYMMETRIC_KEY).is_none());
    }
    // An operator never receives key material; another service has no grant
    // and does not even see the key.
    let g = once(
        &env,
        "eu-central/operator-admin",
        &addr,
        V1_4,
        op::GET,
        vec![uid(&id)],
    )
    .await;
    assert_failed(
        &g,
        reason::PERMISSION_DENIED,
        "operator identities may not export key material",
    );
    let g = once(
        &env,
        "eu-central/service-nogrant",
        &addr,
        V1_4,
        op::GET,
        vec![uid(&id)],
    )
    .await;
    assert_failed(
        &g,
        reason::PERMISSION_DENIED,
        "has no grant to export key material",
    );
    let l = once(
        &env,
        "eu-central/service-nogrant",
        &addr,
        V1_4,
        op::LOCATE,
        locate_by_name("payments"),
    )
    .await;
    assert!(ids(&l).is_empty(), "{l:?}");
    // A service not named in key_creators cannot create keys.
    let c = once(
        &env,
        "eu-central/service-nogrant",
        &addr,
        V1_4,
        op::REGISTER,
        register_payload("mine", &key),
    )
    .await;
    assert_failed(
        &c,
        reason::PERMISSION_DENIED,
        "may not create keys of its own",
    );
    b.server.shutdown().await.unwrap();
}

fn create_payload_v2(name: &str, bits: i32) -> Vec<Item> {
    vec![
        Item::enumeration(tag::OBJECT_TYPE, tag::object_type::SYMMETRIC_KEY),
        Item::structure(
            tag::ATTRIBUTES,
            vec![
                Item::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, tag::alg::AES),
                Item::integer(tag::CRYPTOGRAPHIC_LENGTH, bits),
                Item::new(tag::NAME, name_value(name)),
            ],
        ),
    ]
}

fn gcm_params() -> Item {
    Item::structure(
        tag::CRYPTOGRAPHIC_PARAMETERS,
        vec![
            Item::enumeration(tag::BLOCK_CIPHER_MODE, tag::mode::GCM),
            Item::integer(tag::TAG_LENGTH, 16),
        ],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn created_keys_encrypt_with_caller_parameters_and_never_leave() {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let env = Env::new();
    let (b, addr) = kmip_broker(&env, "eu-central").await;
    let app = "eu-central/service-app";
    let mut c = connect(&env, app, "eu-central", &addr).await;
    // Create + Activate in one batch: the ID Placeholder carries the id.
    let resp = c
        .call(&request(
            V2_0,
            vec![
                (op::CREATE, create_payload_v2("vm-disk", 256)),
                (op::ACTIVATE, vec![]),
            ],
        ))
        .await
        .unwrap();
    check_header(&resp, V2_0, 2);
    let o = outcomes(&resp);
    assert!(o.iter().all(|x| x.status == tag::status::SUCCESS), "{o:?}");
    let id = o[0].text(tag::UNIQUE_IDENTIFIER).unwrap().to_owned();
    assert_eq!(o[1].text(tag::UNIQUE_IDENTIFIER), Some(id.as_str()));
    // Created without Extractable: Get is refused.
    let g = c
        .call(&request(V2_0, vec![(op::GET, vec![uid(&id)])]))
        .await
        .unwrap();
    assert_failed(
        &outcomes(&g)[0],
        reason::PERMISSION_DENIED,
        "not created exportable",
    );
    // GCM with the caller's IV and additional data, then CBC with PKCS#5.
    let iv = [9u8; 12];
    let enc = c
        .call(&request(
            V2_0,
            vec![(
                op::ENCRYPT,
                vec![
                    uid(&id),
                    gcm_params(),
                    Item::bytes(tag::DATA, b"row 17".to_vec()),
                    Item::bytes(tag::IV_COUNTER_NONCE, iv.to_vec()),
                    Item::bytes(
                        tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA,
                        b"table t".to_vec(),
                    ),
                ],
            )],
        ))
        .await
        .unwrap();
    let e = &outcomes(&enc)[0];
    assert_eq!(e.status, 0, "{e:?}");
    assert!(
        e.field(tag::IV_COUNTER_NONCE).is_none(),
        "the caller's IV is not echoed"
    );
    let (ct, t) = (
        e.bytes(tag::DATA).unwrap().to_vec(),
        e.bytes(tag::AUTHENTICATED_ENCRYPTION_TAG).unwrap().to_vec(),
    );
    let dec = |ct: Vec<u8>, t: Vec<u8>, aad: &[u8]| {
        request(
            V2_0,
            vec![(
                op::DECRYPT,
                vec![
                    uid(&id),
                    gcm_params(),
                    Item::bytes(tag::DATA, ct),
                    Item::bytes(tag::IV_COUNTER_NONCE, iv.to_vec()),
                    Item::bytes(tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA, aad.to_vec()),
                    Item::bytes(tag::AUTHENTICATED_ENCRYPTION_TAG, t),
                ],
            )],
        )
    };
    let d = c
        .call(&dec(ct.clone(), t.clone(), b"table t"))
        .await
        .unwrap();
    assert_eq!(outcomes(&d)[0].bytes(tag::DATA).unwrap(), b"row 17");
    let bad = c
        .call(&dec(ct.clone(), t.clone(), b"table u"))
        .await
        .unwrap();
    assert_failed(
        &outcomes(&bad)[0],
        reason::CRYPTOGRAPHIC_FAILURE,
        "decryption failed",
    );
    // A registered key checked against an independent AES-GCM.
    let key = [0x42u8; 32];
    let r = c
        .call(&request(
            V1_4,
            vec![
                (op::REGISTER, register_payload("known", &key)),
                (op::ACTIVATE, vec![]),
            ],
        ))
        .await
        .unwrap();
    let kid = outcomes(&r)[0]
        .text(tag::UNIQUE_IDENTIFIER)
        .unwrap()
        .to_owned();
    let enc = c
        .call(&request(
            V1_4,
            vec![(
                op::ENCRYPT,
                vec![
                    uid(&kid),
                    gcm_params(),
                    Item::bytes(tag::DATA, b"known answer".to_vec()),
                    Item::bytes(tag::IV_COUNTER_NONCE, iv.to_vec()),
                ],
            )],
        ))
        .await
        .unwrap();
    let e = &outcomes(&enc)[0];
    let want = aes_gcm::Aes256Gcm::new_from_slice(&key)
        .unwrap()
        .encrypt(
            aes_gcm::Nonce::from_slice(&iv),
            Payload {
                msg: b"known answer",
                aad: b"",
            },
        )
        .unwrap();
    let mut got = e.bytes(tag::DATA).unwrap().to_vec();
    got.extend_from_slice(e.bytes(tag::AUTHENTICATED_ENCRYPTION_TAG).unwrap());
    assert_eq!(got, want);
    // CBC with PKCS#5 padding and the caller's IV (OpenBao's KMIP seal).
    let cbc = Item::structure(
        tag::CRYPTOGRAPHIC_PARAMETERS,
        vec![
            Item::enumeration(tag::BLOCK_CIPHER_MODE, tag::mode::CBC),
            Item::enumeration(tag::PADDING_METHOD, tag::padding::PKCS5),
        ],
    );
    let enc = c
        .call(&request(
            V1_4,
            vec![(
                op::ENCRYPT,
                vec![
                    uid(&kid),
                    cbc.clone(),
                    Item::bytes(tag::DATA, b"seal".to_vec()),
                    Item::bytes(tag::IV_COUNTER_NONCE, vec![1; 16]),
                ],
            )],
        ))
        .await
        .unwrap();
    let ct = outcomes(&enc)[0].bytes(tag::DATA).unwrap().to_vec();
    assert_eq!(ct.len(), 16);
    let d = c
        .call(&request(
            V1_4,
            vec![(
                op::DECRYPT,
                vec![
                    uid(&kid),
                    cbc,
                    Item::bytes(tag::DATA, ct),
                    Item::bytes(tag::IV_COUNTER_NONCE, vec![1; 16]),
                ],
            )],
        ))
        .await
        .unwrap();
    assert_eq!(outcomes(&d)[0].bytes(tag::DATA).unwrap(), b"seal");
    b.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn attributes_follow_the_request_version() {
    let env = Env::new();
    let (b, addr) = kmip_broker(&env, "eu-central").await;
    let app = "eu-central/service-app";
    let mut p = register_payload("versions", &[1u8; 16]);
    if let Value::Structure(items) = &mut p[1].value {
        items.push(attr("x-tenant", Value::Text("acme".into())));
        items.push(attr("Operation Policy Name", Value::Text("default".into())));
    }
    let r = once(&env, app, &addr, V1_4, op::REGISTER, p).await;
    let id = r.text(tag::UNIQUE_IDENTIFIER).unwrap().to_owned();
    let names_of = |o: &Outcome| -> Vec<String> {
        o.payload
            .iter()
            .filter(|i| i.tag == tag::ATTRIBUTE)
            .map(|a| match &a.children()[0].value {
                Value::Text(s) => s.clone(),
                v => panic!("{v:?}"),
            })
            .collect()
    };
    let v10 = once(&env, app, &addr, V1_0, op::GET_ATTRIBUTES, vec![uid(&id)]).await;
    let n10 = names_of(&v10);
    for want in [
        "Name",
        "State",
        "Cryptographic Length",
        "x-tenant",
        "Operation Policy Name",
        "Cryptographic Usage Mask",
    ] {
        assert!(n10.iter().any(|n| n == want), "1.0 lacks {want}: {n10:?}");
    }
    for absent in ["Original Creation Date", "Extractable", "Sensitive"] {
        assert!(!n10.iter().any(|n| n == absent), "1.0 got {absent}");
    }
    let v12 = once(
        &env,
        app,
        &addr,
        Version { major: 1, minor: 2 },
        op::GET_ATTRIBUTES,
        vec![uid(&id)],
    )
    .await;
    assert!(names_of(&v12).iter().any(|n| n == "Original Creation Date"));
    let v20 = once(&env, app, &addr, V2_0, op::GET_ATTRIBUTES, vec![uid(&id)]).await;
    let attrs = v20
        .field(tag::ATTRIBUTES)
        .expect("2.0: one Attributes structure");
    assert!(attrs.children().iter().any(|i| i.tag == tag::EXTRACTABLE));
    assert!(!attrs
        .children()
        .iter()
        .any(|i| i.tag == tag::OPERATION_POLICY_NAME));
    // Modify Attribute of the Name replaces it; Locate then finds only the new name.
    let m = once(
        &env,
        app,
        &addr,
        V1_4,
        op::MODIFY_ATTRIBUTE,
        vec![uid(&id), attr("Name", name_value("renamed"))],
    )
    .await;
    assert_eq!(m.status, 0, "{m:?}");
    let l = once(
        &env,
        app,
        &addr,
        V1_4,
        op::LOCATE,
        locate_by_name("versions"),
    )
    .await;
    assert!(ids(&l).is_empty());
    let l = once(
        &env,
        app,
        &addr,
        V1_4,
        op::LOCATE,
        locate_by_name("renamed"),
    )
    .await;
    assert_eq!(ids(&l), std::slice::from_ref(&id));
    assert_eq!(
        l.field(tag::LOCATED_ITEMS).map(|i| i.value.clone()),
        Some(Value::Integer(1))
    );
    // Destroy follows the broker's rules: scheduled, with the date shown.
    let d = once(&env, app, &addr, V1_4, op::DESTROY, vec![uid(&id)]).await;
    assert_eq!(d.status, 0, "{d:?}");
    let after = once(
        &env,
        app,
        &addr,
        V1_4,
        op::GET_ATTRIBUTES,
        vec![uid(&id), Item::text(tag::ATTRIBUTE_NAME, "Destroy Date")],
    )
    .await;
    assert_eq!(names_of(&after), ["Destroy Date"]);
    let g = once(&env, app, &addr, V1_4, op::GET, vec![uid(&id)]).await;
    assert_failed(&g, reason::ILLEGAL_OPERATION, "scheduled for destruction");
    b.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_input_gets_an_answer_and_the_server_keeps_serving() {
    let env = Env::new();
    let (b, addr) = kmip_broker(&env, "eu-central").await;
    let app = "eu-central/service-app";
    let mut c = connect(&env, app, "eu-central", &addr).await;
    let good = request(
        V1_4,
        vec![(
            op::QUERY,
            vec![Item::enumeration(
                tag::QUERY_FUNCTION,
                tag::query::OPERATIONS,
            )],
        )],
    )
    .encode();
    let check_ok = |resp: &[u8]| {
        let item = sovkms::kmip::ttlv::decode(resp, &Default::default()).unwrap();
        assert_eq!(outcomes(&item)[0].status, 0);
    };
    check_ok(&c.send_raw(&good).await.unwrap());
    // Every truncation on an 8-byte boundary, with a header that frames it.
    for n in (8..good.len()).step_by(8) {
        let mut t = good[..n].to_vec();
        t[4..8].copy_from_slice(&u32::try_from(n - 8).unwrap().to_be_bytes());
        let resp = c.send_raw(&t).await.unwrap();
        let item = sovkms::kmip::ttlv::decode(&resp, &Default::default()).unwrap();
        let o = outcomes(&item);
        assert_eq!(
            o[0].status,
            tag::status::OPERATION_FAILED,
            "truncated to {n}"
        );
        assert!(o[0].message.as_deref().is_some_and(|m| !m.is_empty()));
    }
    check_ok(&c.send_raw(&good).await.unwrap());
    // Wrong protocol versions: refused, answered in the version asked.
    for (major, minor) in [(3, 0), (1, 5), (0, 9)] {
        let v = Version { major, minor };
        let resp = c
            .call(&request(v, vec![(op::QUERY, vec![])]))
            .await
            .unwrap();
        check_header(&resp, v, 1);
        assert_failed(
            &outcomes(&resp)[0],
            reason::INVALID_MESSAGE,
            "is not supported",
        );
    }
    // A wrong type, an unknown tag, an operation this server does not do.
    let resp = c
        .call(&request(
            V1_4,
            vec![(op::GET, vec![Item::integer(tag::UNIQUE_IDENTIFIER, 5)])],
        ))
        .await
        .unwrap();
    assert_failed(
        &outcomes(&resp)[0],
        reason::INVALID_FIELD,
        "Unique Identifier must be a Text String",
    );
    let resp = c
        .call(&request(
            V1_4,
            vec![(op::GET, vec![Item::text(0x42FFFF, "x")])],
        ))
        .await
        .unwrap();
    assert_failed(
        &outcomes(&resp)[0],
        reason::INVALID_MESSAGE,
        "unknown tag 42FFFF",
    );
    let resp = c.call(&request(V1_4, vec![(0x06, vec![])])).await.unwrap();
    assert_failed(
        &outcomes(&resp)[0],
        reason::OPERATION_NOT_SUPPORTED,
        "is not supported",
    );
    // Deep nesting.
    let mut deep = Item::integer(tag::BATCH_COUNT, 1);
    for _ in 0..40 {
        deep = Item::structure(tag::REQUEST_PAYLOAD, vec![deep]);
    }
    let resp = c
        .call(&request(V1_4, vec![(op::QUERY, vec![deep])]))
        .await
        .unwrap();
    assert_failed(
        &outcomes(&resp)[0],
        reason::INVALID_MESSAGE,
        "nested more than",
    );
    // A batch: Stop (the default) ends at the first failure, Continue goes on.
    let batch = |cont: Option<u32>| {
        let mut m = request(
            V1_4,
            vec![(op::GET, vec![uid("k-missing")]), (op::QUERY, vec![])],
        );
        if let (Some(cv), Value::Structure(items)) = (cont, &mut m.value) {
            if let Value::Structure(h) = &mut items[0].value {
                h.push(Item::enumeration(tag::BATCH_ERROR_CONTINUATION_OPTION, cv));
            }
        }
        m
    };
    let resp = c.call(&batch(None)).await.unwrap();
    check_header(&resp, V1_4, 1);
    assert_failed(&outcomes(&resp)[0], reason::ITEM_NOT_FOUND, "not found");
    let resp = c
        .call(&batch(Some(tag::continuation::CONTINUE)))
        .await
        .unwrap();
    check_header(&resp, V1_4, 2);
    assert_eq!(outcomes(&resp)[1].status, 0);
    // Still serving on the same connection.
    check_ok(&c.send_raw(&good).await.unwrap());
    // Unframeable bytes and a 4 GiB length: one answer, then the connection closes.
    for bad in [
        vec![0xAB; 64],
        vec![0x42, 0x00, 0x78, 0x01, 0xFF, 0xFF, 0xFF, 0xF8],
    ] {
        let mut c = connect(&env, app, "eu-central", &addr).await;
        let resp = c.send_raw(&bad).await.unwrap();
        let item = sovkms::kmip::ttlv::decode(&resp, &Default::default()).unwrap();
        assert_failed(&outcomes(&item)[0], reason::INVALID_MESSAGE, "");
        assert!(
            c.send_raw(&good).await.is_err(),
            "connection closed after unframeable bytes"
        );
    }
    // Random bytes inside a valid frame.
    let mut rng_state = 0x1234_5678_u32;
    for _ in 0..50 {
        let mut body = vec![0u8; 64];
        for x in &mut body {
            rng_state = rng_state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *x = (rng_state >> 16) as u8;
        }
        let mut m = vec![0x42, 0x00, 0x78, 0x01, 0, 0, 0, 64];
        m.extend_from_slice(&body);
        let resp = c.send_raw(&m).await.unwrap();
        let item = sovkms::kmip::ttlv::decode(&resp, &Default::default()).unwrap();
        assert_eq!(outcomes(&item)[0].status, tag::status::OPERATION_FAILED);
    }
    check_ok(&c.send_raw(&good).await.unwrap());
    b.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn tls12_resumption_and_credentials_are_not_identities() {
    let env = Env::new();
    let (b, addr) = kmip_broker(&env, "eu-central").await;
    let cfg = client_config(&env.tls("eu-central/service-app", "eu-central"), true).unwrap();
    let mut c = KmipClient::connect(&addr, Arc::clone(&cfg), "localhost")
        .await
        .unwrap();
    assert_eq!(c.tls_version(), "TLS 1.2");
    let resp = c
        .call(&request(V1_0, vec![(op::DISCOVER_VERSIONS, vec![])]))
        .await
        .unwrap();
    let o = &outcomes(&resp)[0];
    let versions: Vec<&Item> = o
        .payload
        .iter()
        .filter(|i| i.tag == tag::PROTOCOL_VERSION)
        .collect();
    assert_eq!(versions.len(), 7, "{o:?}");
    assert_eq!(*versions[0], Version { major: 2, minor: 1 }.item());
    drop(c);
    let c2 = KmipClient::connect(&addr, cfg, "localhost").await.unwrap();
    assert!(c2.resumed(), "the second connection resumes the session");
    // A certificate without a SPIFFE id, plus a Credential: refused, and told why.
    let mut c = connect(&env, "eu-central/nospiffe-service", "eu-central", &addr).await;
    let mut m = request(V1_4, vec![(op::QUERY, vec![])]);
    if let Value::Structure(items) = &mut m.value {
        if let Value::Structure(h) = &mut items[0].value {
            h.insert(
                1,
                Item::structure(
                    tag::AUTHENTICATION,
                    vec![Item::structure(tag::CREDENTIAL, vec![])],
                ),
            );
        }
    }
    let resp = c.call(&m).await.unwrap();
    assert_failed(
        &outcomes(&resp)[0],
        reason::AUTHENTICATION_NOT_SUCCESSFUL,
        "a KMIP Credential is not an identity here",
    );
    b.server.shutdown().await.unwrap();
}

/// PyKMIP (PyPI, in the venv `deploy/deps.sh` makes) against the broker:
/// Discover Versions, Create, Get Attributes, Activate, Encrypt/Decrypt,
/// Register, Locate, Get (1.0, 1.2, 2.0 headers), secret data, Revoke,
/// Destroy; and Get/Decrypt refused to other regions, the central plane
/// and an operator.
#[tokio::test(flavor = "multi_thread")]
async fn pykmip_client_against_the_broker() {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyvenv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `bash deploy/deps.sh` (it installs PyKMIP in a venv)",
        python.display()
    );
    let env = Env::new();
    let (b, addr) = kmip_broker(&env, "eu-central").await;
    let port = addr.rsplit_once(':').unwrap().1.to_owned();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pykmip/scenario.py");
    let pki = env.pki.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .args(["localhost", &port])
            .arg(&pki)
            .arg("eu-central")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "PyKMIP scenario failed:\n{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["discover_versions"][0], "2.1", "{v}");
    assert_eq!(v["decrypted"], "patient 1234");
    assert_eq!(v["ciphertext_len"], 16);
    for a in [
        "Cryptographic Algorithm",
        "Cryptographic Length",
        "Name",
        "State",
        "Unique Identifier",
    ] {
        assert!(
            v["created_attributes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == a),
            "{a}: {v}"
        );
    }
    assert_eq!(v["get_created"][0], "failed");
    assert_eq!(v["get_created"][1], "PERMISSION_DENIED");
    let registered = v["registered"].as_str().unwrap();
    assert_eq!(v["located"], serde_json::json!([registered]));
    assert_eq!(v["got"], hex::encode((16u8..32).collect::<Vec<_>>()));
    assert_eq!(v["got_KMIP_1_0"][1], v["got"]);
    assert_eq!(v["got_KMIP_2_0"][1], v["got"]);
    assert_eq!(v["secret"], "db password");
    for (who, region) in [
        ("us-east/service-app", "us-east"),
        ("central/service-app", "central"),
    ] {
        for what in ["get", "decrypt"] {
            let r = &v[format!("{what} as {who}")];
            assert_eq!(r[0], "failed", "{what} as {who}: {r}");
            assert_eq!(r[1], "PERMISSION_DENIED", "{r}");
            assert!(
                r[2].as_str()
                    .unwrap()
                    .contains(&format!("caller region {region} may not")),
                "{r}"
            );
        }
    }
    let r = &v["get as eu-central/operator-admin"];
    assert_eq!(r[1], "PERMISSION_DENIED", "{r}");
    assert!(
        r[2].as_str()
            .unwrap()
            .contains("operator identities may not export key material"),
        "{r}"
    );
    assert_eq!(v["after_destroy"][0], "failed", "{v}");
    // Every step is in the one audit chain, protocol kmip.
    let recs = read_records(&b.audit_path);
    for op in [
        "Create",
        "Register",
        "Locate",
        "Get",
        "Activate",
        "Encrypt",
        "Decrypt",
        "Revoke",
        "Destroy",
        "Discover Versions",
    ] {
        assert!(
            recs.iter()
                .any(|r| r.operation == op && r.protocol == "kmip"),
            "no {op} record"
        );
    }
    b.server.shutdown().await.unwrap();
}

/// MongoDB's KMIP client (libmongocrypt's kms-message, from its public
/// source): Register Secret Data (Seed, Raw, 96 bytes, an empty
/// Template-Attribute, batch item id "A") under 1.4, Activate, Get without
/// a Key Format Type; and its delegated encryption: Encrypt under 1.2 with
/// AES-CBC, PKCS#5 and Random IV, Decrypt with the IV returned.
#[tokio::test(flavor = "multi_thread")]
async fn mongodb_sequence_secret_data_and_delegated_encryption() {
    let env = Env::new();
    let (b, addr) = kmip_broker(&env, "eu-central").await;
    let app = "eu-central/service-app";
    let v1_2 = Version { major: 1, minor: 2 };
    let secret: Vec<u8> = (0u8..96).collect();
    let mut c = connect(&env, app, "eu-central", &addr).await;
    let mut register = request(
        V1_4,
        vec![(
            op::REGISTER,
            vec![
                Item::enumeration(tag::OBJECT_TYPE, tag::object_type::SECRET_DATA),
                Item::structure(tag::TEMPLATE_ATTRIBUTE, vec![]),
                Item::structure(
                    tag::SECRET_DATA,
                    vec![
                        Item::enumeration(tag::SECRET_DATA_TYPE, 2),
                        Item::structure(
                            tag::KEY_BLOCK,
                            vec![
                                Item::enumeration(tag::KEY_FORMAT_TYPE, tag::format::RAW),
                                Item::structure(
                                    tag::KEY_VALUE,
                                    vec![Item::bytes(tag::KEY_MATERIAL, secret.clone())],
                                ),
                            ],
                        ),
                    ],
                ),
            ],
        )],
    );
    // kms-message names its single batch item "A".
    if let Value::Structure(items) = &mut register.value {
        if let Value::Structure(bi) = &mut items[1].value {
            bi.insert(1, Item::bytes(tag::UNIQUE_BATCH_ITEM_ID, b"A".to_vec()));
        }
    }
    let resp = c.call(&register).await.unwrap();
    check_header(&resp, V1_4, 1);
    let item = &resp.children()[1];
    let fields: Vec<u32> = item.children().iter().map(|i| i.tag).collect();
    assert_eq!(
        fields,
        [
            tag::OPERATION,
            tag::UNIQUE_BATCH_ITEM_ID,
            tag::RESULT_STATUS,
            tag::RESPONSE_PAYLOAD
        ]
    );
    assert_eq!(
        item.children()[1],
        Item::bytes(tag::UNIQUE_BATCH_ITEM_ID, b"A".to_vec())
    );
    let id = outcomes(&resp)[0]
        .text(tag::UNIQUE_IDENTIFIER)
        .unwrap()
        .to_owned();
    let a = once(&env, app, &addr, V1_4, op::ACTIVATE, vec![uid(&id)]).await;
    assert_eq!(a.status, 0, "{a:?}");
    let g = once(&env, app, &addr, V1_4, op::GET, vec![uid(&id)]).await;
    assert_eq!(
        g.field(tag::OBJECT_TYPE).unwrap().value,
        Value::Enumeration(7)
    );
    let sd = g.field(tag::SECRET_DATA).expect("Secret Data");
    assert_eq!(
        sd.children()[0],
        Item::enumeration(tag::SECRET_DATA_TYPE, 2)
    );
    let kv = sd.children()[1]
        .children()
        .iter()
        .find(|i| i.tag == tag::KEY_VALUE)
        .unwrap();
    assert_eq!(kv.children()[0], Item::bytes(tag::KEY_MATERIAL, secret));
    // Delegated encryption with a key MongoDB created.
    let cr = once(&env, app, &addr, v1_2, op::CREATE, {
        let mut p = register_payload("mongo-cmk", &[0; 32]);
        p.truncate(2); // Object Type and Template-Attribute: Create generates
        p
    })
    .await;
    assert_eq!(cr.status, 0, "{cr:?}");
    let key = cr.text(tag::UNIQUE_IDENTIFIER).unwrap().to_owned();
    assert_eq!(
        once(&env, app, &addr, v1_2, op::ACTIVATE, vec![uid(&key)])
            .await
            .status,
        0
    );
    let params = |random_iv: bool| {
        let mut p = vec![
            Item::enumeration(tag::BLOCK_CIPHER_MODE, tag::mode::CBC),
            Item::enumeration(tag::PADDING_METHOD, tag::padding::PKCS5),
            Item::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, tag::alg::AES),
        ];
        if random_iv {
            p.push(Item::new(tag::RANDOM_IV, Value::Boolean(true)));
        }
        Item::structure(tag::CRYPTOGRAPHIC_PARAMETERS, p)
    };
    let dek = [0xD5u8; 96];
    let e = once(
        &env,
        app,
        &addr,
        v1_2,
        op::ENCRYPT,
        vec![
            uid(&key),
            params(true),
            Item::bytes(tag::DATA, dek.to_vec()),
        ],
    )
    .await;
    assert_eq!(e.status, 0, "{e:?}");
    let iv = e
        .bytes(tag::IV_COUNTER_NONCE)
        .expect("the server's random IV")
        .to_vec();
    assert_eq!(iv.len(), 16);
    let ct = e.bytes(tag::DATA).unwrap().to_vec();
    assert_eq!(ct.len(), 112, "96 bytes and a block of PKCS#5 padding");
    let d = once(
        &env,
        app,
        &addr,
        v1_2,
        op::DECRYPT,
        vec![
            uid(&key),
            params(false),
            Item::bytes(tag::DATA, ct),
            Item::bytes(tag::IV_COUNTER_NONCE, iv),
        ],
    )
    .await;
    assert_eq!(d.bytes(tag::DATA).unwrap(), dek);
    b.server.shutdown().await.unwrap();
}

/// Clients that fetch the keys they create (vSphere, backup systems): keys
/// created by a principal in `[kmip] exportable_for` come back from Get;
/// keys created by others only when the request asked for export.
#[tokio::test(flavor = "multi_thread")]
async fn creators_listed_as_exportable_get_what_they_create() {
    let env = Env::new();
    let app = spiffe("eu-central", "service", "app");
    let tail = format!(
        "\n[kmip]\nlisten = \"127.0.0.1:0\"\nkey_creators = [\"{app}\", \"{}\"]\nexportable_for = [\"{app}\"]\n",
        spiffe("eu-central", "service", "nogrant")
    );
    let b = start_broker_from(
        &env,
        "eu-central",
        &env.config_with_tail("eu-central", &tail),
    )
    .await;
    let addr = b.server.kmip_addr.unwrap().to_string();
    let create = |name: &str| {
        let mut p = register_payload(name, &[0; 32]);
        p.truncate(2);
        p
    };
    for (who, exported) in [
        ("eu-central/service-app", true),
        ("eu-central/service-nogrant", false),
    ] {
        let c = once(&env, who, &addr, V1_4, op::CREATE, create(who)).await;
        assert_eq!(c.status, 0, "{c:?}");
        let id = c.text(tag::UNIQUE_IDENTIFIER).unwrap().to_owned();
        let g = once(&env, who, &addr, V1_4, op::GET, vec![uid(&id)]).await;
        if exported {
            assert_eq!(key_material(&g).len(), 32, "{g:?}");
        } else {
            assert_failed(&g, reason::PERMISSION_DENIED, "not created exportable");
        }
    }
    b.server.shutdown().await.unwrap();
}

/// ReKey makes a new key and moves the Name to it: Locate by that name then
/// finds only the new key; the old one keeps its material, without a name.
#[tokio::test(flavor = "multi_thread")]
async fn rekey_moves_the_name_to_the_new_key() {
    let env = Env::new();
    let (b, addr) = kmip_broker(&env, "eu-central").await;
    let app = "eu-central/service-app";
    let key = [3u8; 16];
    let r = once(
        &env,
        app,
        &addr,
        V1_4,
        op::REGISTER,
        register_payload("tde-master", &key),
    )
    .await;
    let old = r.text(tag::UNIQUE_IDENTIFIER).unwrap().to_owned();
    assert_eq!(
        once(&env, app, &addr, V1_4, op::ACTIVATE, vec![uid(&old)])
            .await
            .status,
        0
    );
    let k = once(&env, app, &addr, V1_4, op::REKEY, vec![uid(&old)]).await;
    assert_eq!(k.status, 0, "{k:?}");
    let new = k.text(tag::UNIQUE_IDENTIFIER).unwrap().to_owned();
    assert_ne!(new, old);
    let l = once(
        &env,
        app,
        &addr,
        V1_0,
        op::LOCATE,
        locate_by_name("tde-master"),
    )
    .await;
    assert_eq!(ids(&l), std::slice::from_ref(&new));
    let g_new = once(&env, app, &addr, V1_0, op::GET, vec![uid(&new)]).await;
    let g_old = once(&env, app, &addr, V1_0, op::GET, vec![uid(&old)]).await;
    assert_eq!(key_material(&g_old), key, "the old key keeps its material");
    assert_eq!(key_material(&g_new).len(), 16);
    assert_ne!(key_material(&g_new), key);
    // The new key inherits state and ownership: it encrypts at once.
    let e = once(
        &env,
        app,
        &addr,
        V1_4,
        op::ENCRYPT,
        vec![uid(&new), Item::bytes(tag::DATA, b"x".to_vec())],
    )
    .await;
    assert_eq!(e.status, 0, "{e:?}");
    // Another service may not rekey it.
    let k = once(
        &env,
        "eu-central/service-nogrant",
        &addr,
        V1_4,
        op::REKEY,
        vec![uid(&new)],
    )
    .await;
    assert_failed(&k, reason::PERMISSION_DENIED, "has no grant to rekey keys");
    let recs = read_records(&b.audit_path);
    assert!(recs.iter().any(|r| r.operation == "ReKey"
        && r.key_id == old
        && r.reason == format!("replaced by {new}")));
    b.server.shutdown().await.unwrap();
}

fn wrap_spec(wrapping: &str, mode: u32) -> Item {
    Item::structure(
        tag::KEY_WRAPPING_SPECIFICATION,
        vec![
            Item::enumeration(0x42009E, 1), // Wrapping Method: Encrypt
            Item::structure(
                tag::ENCRYPTION_KEY_INFORMATION,
                vec![
                    uid(wrapping),
                    Item::structure(
                        tag::CRYPTOGRAPHIC_PARAMETERS,
                        vec![Item::enumeration(tag::BLOCK_CIPHER_MODE, mode)],
                    ),
                ],
            ),
            Item::enumeration(0x4200A3, 1), // Encoding Option: No Encoding
        ],
    )
}

/// Storage systems fetch keys wrapped by a key of their own: Get with a Key
/// Wrapping Specification returns the key under AES key wrap (RFC 3394, or
/// RFC 5649 with padding), checked here with an independent implementation.
#[tokio::test(flavor = "multi_thread")]
async fn get_wrapped_by_another_key() {
    use aes::cipher::generic_array::GenericArray;
    let env = Env::new();
    let (b, addr) = kmip_broker(&env, "eu-central").await;
    let app = "eu-central/service-app";
    let target = [0x11u8; 16];
    let kek = [0x22u8; 32];
    let t = once(
        &env,
        app,
        &addr,
        V1_4,
        op::REGISTER,
        register_payload("disk-key", &target),
    )
    .await;
    let t = t.text(tag::UNIQUE_IDENTIFIER).unwrap().to_owned();
    let w = once(
        &env,
        app,
        &addr,
        V1_4,
        op::REGISTER,
        register_payload("array-kek", &kek),
    )
    .await;
    let w = w.text(tag::UNIQUE_IDENTIFIER).unwrap().to_owned();
    // The wrapping key must be active.
    let g = once(
        &env,
        app,
        &addr,
        V1_4,
        op::GET,
        vec![uid(&t), wrap_spec(&w, 0x0D)],
    )
    .await;
    assert_failed(&g, reason::ILLEGAL_OPERATION, "pre-active");
    assert_eq!(
        once(&env, app, &addr, V1_4, op::ACTIVATE, vec![uid(&w)])
            .await
            .status,
        0
    );
    let g = once(
        &env,
        app,
        &addr,
        V1_4,
        op::GET,
        vec![uid(&t), wrap_spec(&w, 0x0D)],
    )
    .await;
    assert_eq!(g.status, 0, "{g:?}");
    let wrapped = key_material(&g);
    let block = &g.field(tag::SYMMETRIC_KEY).unwrap().children()[0];
    assert!(block
        .children()
        .iter()
        .any(|i| i.tag == tag::KEY_WRAPPING_DATA));
    let mut out = [0u8; 16];
    aes_kw::KekAes256::new(GenericArray::from_slice(&kek))
        .unwrap(&wrapped, &mut out)
        .unwrap();
    assert_eq!(out, target);
    // RFC 5649 (with padding).
    let g = once(
        &env,
        app,
        &addr,
        V1_4,
        op::GET,
        vec![uid(&t), wrap_spec(&w, 0x0C)],
    )
    .await;
    let wrapped = key_material(&g);
    let mut out = [0u8; 16];
    let got = aes_kw::KekAes256::new(GenericArray::from_slice(&kek))
        .unwrap_with_padding(&wrapped, &mut out)
        .unwrap();
    assert_eq!(got, target);
    // Another region gets nothing, wrapped or not.
    let g = once(
        &env,
        "us-east/service-app",
        &addr,
        V1_4,
        op::GET,
        vec![uid(&t), wrap_spec(&w, 0x0D)],
    )
    .await;
    assert_failed(
        &g,
        reason::PERMISSION_DENIED,
        "caller region us-east may not export key material",
    );
    b.server.shutdown().await.unwrap();
}

/// Create Key Pair (RSA, as backup systems ask): two linked objects; the
/// public key comes back as PKCS#1 and X.509, the private key (created
/// exportable) as PKCS#8 that matches it; other regions get neither.
#[tokio::test(flavor = "multi_thread")]
async fn create_key_pair_rsa() {
    use aws_lc_rs::signature::KeyPair as _;
    let env = Env::new();
    let (b, addr) = kmip_broker(&env, "eu-central").await;
    let app = "eu-central/service-app";
    let template = |t: u32, name: &str, extra: Vec<Item>| {
        let mut a = vec![attr("Name", name_value(name))];
        a.extend(extra);
        Item::structure(t, a)
    };
    let r = once(
        &env,
        app,
        &addr,
        V1_4,
        op::CREATE_KEY_PAIR,
        vec![
            Item::structure(
                tag::COMMON_TEMPLATE_ATTRIBUTE,
                vec![
                    attr("Cryptographic Algorithm", Value::Enumeration(tag::alg::RSA)),
                    attr("Cryptographic Length", Value::Integer(2048)),
                ],
            ),
            template(
                tag::PRIVATE_KEY_TEMPLATE_ATTRIBUTE,
                "backup-priv",
                vec![attr(
                    "Cryptographic Usage Mask",
                    Value::Integer(0x01 | 0x40),
                )],
            ),
            template(tag::PUBLIC_KEY_TEMPLATE_ATTRIBUTE, "backup-pub", vec![]),
        ],
    )
    .await;
    assert_eq!(r.status, 0, "{r:?}");
    let privk = r
        .text(tag::PRIVATE_KEY_UNIQUE_IDENTIFIER)
        .unwrap()
        .to_owned();
    let pubk = r
        .text(tag::PUBLIC_KEY_UNIQUE_IDENTIFIER)
        .unwrap()
        .to_owned();
    let material = |o: &Outcome, t: u32| -> Vec<u8> {
        let kb = &o.field(t).unwrap().children()[0];
        let kv = kb
            .children()
            .iter()
            .find(|i| i.tag == tag::KEY_VALUE)
            .unwrap();
        match &kv.children()[0].value {
            Value::Bytes(b) => b.to_vec(),
            v => panic!("{v:?}"),
        }
    };
    let gp = once(&env, app, &addr, V1_4, op::GET, vec![uid(&pubk)]).await;
    assert_eq!(gp.status, 0, "{gp:?}");
    let pkcs1 = material(&gp, tag::PUBLIC_KEY);
    let gx = once(
        &env,
        app,
        &addr,
        V1_4,
        op::GET,
        vec![
            uid(&pubk),
            Item::enumeration(tag::KEY_FORMAT_TYPE, tag::format::X_509),
        ],
    )
    .await;
    let spki = material(&gx, tag::PUBLIC_KEY);
    assert!(spki.ends_with(&pkcs1) && spki.len() > pkcs1.len() + 15);
    let gs = once(&env, app, &addr, V1_4, op::GET, vec![uid(&privk)]).await;
    assert_eq!(gs.status, 0, "{gs:?}");
    let pair = aws_lc_rs::rsa::KeyPair::from_pkcs8(&material(&gs, tag::PRIVATE_KEY)).unwrap();
    assert_eq!(pair.public_key().as_ref(), pkcs1.as_slice());
    // Linked both ways.
    let a = once(
        &env,
        app,
        &addr,
        V1_4,
        op::GET_ATTRIBUTES,
        vec![uid(&privk), Item::text(tag::ATTRIBUTE_NAME, "Link")],
    )
    .await;
    let link = &a.field(tag::ATTRIBUTE).unwrap().children()[1];
    assert!(link
        .children()
        .contains(&Item::text(tag::LINKED_OBJECT_IDENTIFIER, pubk.clone())));
    // Locate finds RSA keys by algorithm and length.
    let l = once(
        &env,
        app,
        &addr,
        V1_4,
        op::LOCATE,
        vec![
            attr(
                "Object Type",
                Value::Enumeration(tag::object_type::PRIVATE_KEY),
            ),
            attr("Cryptographic Length", Value::Integer(2048)),
        ],
    )
    .await;
    assert_eq!(ids(&l), std::slice::from_ref(&privk));
    let g = once(
        &env,
        "us-east/service-app",
        &addr,
        V1_4,
        op::GET,
        vec![uid(&privk)],
    )
    .await;
    assert_failed(
        &g,
        reason::PERMISSION_DENIED,
        "caller region us-east may not export key material",
    );
    b.server.shutdown().await.unwrap();
}

/// The fuzz target's corpus (tests/corpus/kmip_ttlv: 437 inputs kept by 10
/// million libFuzzer runs of `kmip_ttlv`) replayed on every CI run: the
/// decoder's round trip, and every decodable input answered by a real
/// broker's KMIP handler with a well-formed response.
#[tokio::test(flavor = "multi_thread")]
async fn fuzz_corpus_replays_through_a_real_broker() {
    use sovkms::kmip::ttlv::{decode, Limits};
    let env = Env::new();
    let (b, _addr) = kmip_broker(&env, "eu-central").await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/kmip_ttlv");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 100,
        "the corpus is missing: {}",
        dir.display()
    );
    let caller = Arc::new(
        sovkms::region::Caller::parse_spiffe(&spiffe("eu-central", "service", "app")).unwrap(),
    );
    let broker = Arc::clone(&b.broker);
    let answered = tokio::task::spawn_blocking(move || {
        let limits = Limits::default();
        let mut n = 0;
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            if let Ok(item) = decode(&bytes, &limits) {
                assert_eq!(item.encode(), bytes, "{}", f.display());
            }
            let resp = sovkms::kmip::handle(&broker, Ok(Arc::clone(&caller)), &bytes, &limits);
            let item = decode(&resp, &limits).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert_eq!(item.tag, tag::RESPONSE_MESSAGE);
            for o in outcomes(&item) {
                if o.status != 0 {
                    assert!(
                        o.message.as_deref().is_some_and(|m| !m.is_empty()),
                        "{}",
                        f.display()
                    );
                }
            }
            n += 1;
        }
        n
    })
    .await
    .unwrap();
    assert!(answered >= 100);
    b.server.shutdown().await.unwrap();
}

/// A client's Maximum Response Size is honoured: a larger answer becomes
/// Response Too Large (with its message), and typical answers stay far
/// below the 8 KiB some clients read at most.
#[tokio::test(flavor = "multi_thread")]
async fn maximum_response_size_is_honoured() {
    let env = Env::new();
    let (b, addr) = kmip_broker(&env, "eu-central").await;
    let app = "eu-central/service-app";
    let r = once(
        &env,
        app,
        &addr,
        V1_4,
        op::REGISTER,
        register_payload("sized", &[9; 32]),
    )
    .await;
    let id = r.text(tag::UNIQUE_IDENTIFIER).unwrap().to_owned();
    let mut c = connect(&env, app, "eu-central", &addr).await;
    let mut m = request(V1_4, vec![(op::GET_ATTRIBUTES, vec![uid(&id)])]);
    let full = c.send_raw(&m.encode()).await.unwrap();
    assert!(full.len() < 8 * 1024, "{} bytes", full.len());
    if let Value::Structure(items) = &mut m.value {
        if let Value::Structure(h) = &mut items[0].value {
            h.insert(1, Item::integer(tag::MAXIMUM_RESPONSE_SIZE, 64));
        }
    }
    let resp = c.call(&m).await.unwrap();
    assert_failed(
        &outcomes(&resp)[0],
        reason::RESPONSE_TOO_LARGE,
        "Maximum Response Size of 64",
    );
    b.server.shutdown().await.unwrap();
}
