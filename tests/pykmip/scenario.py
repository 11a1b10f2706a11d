"""PyKMIP, a real third-party KMIP client, against a sovkms broker.

Usage: scenario.py HOST PORT PKI_DIR BROKER_REGION
Prints one JSON object: what each step returned. The Rust test
(tests/kmip.rs, pykmip_client_against_the_broker) judges it.
"""
import json
import sys

from kmip.core import enums
from kmip.core.factories import attributes as attribute_factories
from kmip.pie import client as pie_client
from kmip.pie import exceptions, objects

host, port, pki, broker_region = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
out = {}


def connect(who, version=enums.KMIPVersion.KMIP_1_2):
    region, stem = who.split("/")
    c = pie_client.ProxyKmipClient(
        hostname=host,
        port=port,
        cert=f"{pki}/{region}/{stem}.pem",
        key=f"{pki}/{region}/{stem}.key",
        ca=f"{pki}/{broker_region}/ca.pem",
        # PyKMIP passes no server name, so it checks the chain, not the name.
        ssl_version="PROTOCOL_TLS",
        config_file="/dev/null",
        kmip_version=version,
    )
    c.open()
    return c


def failure(f):
    """Runs f; returns ("ok", value) or ("failed", reason name, message)."""
    try:
        return ["ok", f()]
    except exceptions.KmipOperationFailure as e:
        return ["failed", e.reason.name if e.reason else None, e.message]


app = connect(f"{broker_region}/service-app")
out["discover_versions"] = [
    f"{v.major}.{v.minor}" for v in app.proxy.discover_versions().protocol_versions
]
# Create, read attributes, activate, encrypt and decrypt with AES-CBC.
created = app.create(enums.CryptographicAlgorithm.AES, 256, name="pykmip-created")
out["created"] = created
attrs = app.get_attributes(created)[1]
out["created_attributes"] = sorted(a.attribute_name.value for a in attrs)
out["attribute_list"] = sorted(app.get_attribute_list(created))
app.activate(created)
params = {
    "cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
    "block_cipher_mode": enums.BlockCipherMode.CBC,
    "padding_method": enums.PaddingMethod.PKCS5,
}
iv = bytes(range(16))
ct, _ = app.encrypt(b"patient 1234", uid=created, cryptographic_parameters=params, iv_counter_nonce=iv)
out["ciphertext_len"] = len(ct)
out["decrypted"] = app.decrypt(ct, uid=created, cryptographic_parameters=params, iv_counter_nonce=iv).decode()
out["get_created"] = failure(lambda: app.get(created).value.hex())
# Register a key with a name, find it by name, fetch it.
key = bytes(range(16, 32))
registered = app.register(objects.SymmetricKey(enums.CryptographicAlgorithm.AES, 128, key, name="pykmip-registered"))
out["registered"] = registered
name_attr = attribute_factories.AttributeFactory().create_attribute(
    enums.AttributeType.NAME, "pykmip-registered"
)
out["located"] = app.locate(attributes=[name_attr])
out["got"] = app.get(registered).value.hex()
secret = app.register(objects.SecretData(b"db password", enums.SecretDataType.PASSWORD, name="pykmip-secret"))
out["secret"] = app.get(secret).value.decode()
app.close()

# The same under KMIP 1.0 and 2.0 headers.
for version in (enums.KMIPVersion.KMIP_1_0, enums.KMIPVersion.KMIP_2_0):
    c = connect(f"{broker_region}/service-app", version)
    out[f"got_{version.name}"] = failure(lambda: c.get(registered).value.hex())
    c.close()

# Everyone else: other regions, the central plane, an operator.
for who in ["us-east/service-app", "central/service-app", f"{broker_region}/operator-admin"]:
    c = connect(who)
    out[f"get as {who}"] = failure(lambda: c.get(registered).value.hex())
    out[f"decrypt as {who}"] = failure(
        lambda: c.decrypt(ct, uid=created, cryptographic_parameters=params, iv_counter_nonce=iv).decode()
    )
    c.close()

# Revoke and destroy (scheduled, per the broker's rules).
app = connect(f"{broker_region}/service-app")
app.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, created)
app.destroy(created)
out["after_destroy"] = failure(
    lambda: app.encrypt(b"x", uid=created, cryptographic_parameters=params, iv_counter_nonce=iv)
)
app.close()
print(json.dumps(out))
