"""Known-answer vectors for the streaming file format v1 (src/file.rs),
made by an independent implementation (pyca/cryptography, not aws-lc or
any code of sovkms). Run with the project's venv:

    target/pyvenv/bin/python tests/vectors/gen_file_v1.py > tests/vectors/file_v1.json
"""

import hashlib
import json

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def header(log2, salt, prefix, region, key_id, wrapped):
    return (
        b"SVKF"
        + bytes([1, log2])
        + salt
        + prefix
        + bytes([len(region)]) + region.encode()
        + bytes([len(key_id)]) + key_id.encode()
        + len(wrapped).to_bytes(4, "big") + wrapped
    )


def seal(data_key, log2, salt, prefix, region, key_id, wrapped, pt):
    h = header(log2, salt, prefix, region, key_id, wrapped)
    info = b"sovkms/v1/file" + hashlib.sha256(h).digest()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(data_key)
    size = 1 << log2
    chunks = [pt[i : i + size] for i in range(0, len(pt), size)] or [b""]
    out = h
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        nonce = prefix + i.to_bytes(4, "big") + bytes([1 if last else 0])
        out += AESGCM(key).encrypt(nonce, chunk, None)
    return out


vectors = []
for n, length in enumerate([0, 100, 1024, 1025, 3000]):
    data_key = hashlib.sha256(b"data key %d" % n).digest()
    salt = hashlib.sha256(b"salt %d" % n).digest()[:16]
    prefix = hashlib.sha256(b"prefix %d" % n).digest()[:7]
    wrapped = hashlib.sha256(b"wrapped %d" % n).digest() * 3
    pt = bytes((i * 7 + n) % 256 for i in range(length))
    args = dict(log2=10, region="eu-central", key_id="k-%032x" % n)
    f = seal(data_key, args["log2"], salt, prefix, args["region"], args["key_id"], wrapped, pt)
    vectors.append(
        {
            "data_key": data_key.hex(),
            "segment_log2": args["log2"],
            "salt": salt.hex(),
            "nonce_prefix": prefix.hex(),
            "region": args["region"],
            "key_id": args["key_id"],
            "wrapped_key": wrapped.hex(),
            "plaintext": pt.hex(),
            "file": f.hex(),
        }
    )
print(json.dumps({"format": "sovkms file v1", "generator": "pyca/cryptography", "vectors": vectors}, indent=1))
