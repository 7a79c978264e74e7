#!/usr/bin/env bash
# Golden vectors for K3s's CA hash (api/src/k3s/cahash.rs), made by independent tools only:
# openssl makes the certificates, sha256sum gives the expected hashes. Run once; the output
# is checked in, so the test never depends on basalt's own code to know the answer.
#
#   single.pem       one self-signed CA        -> sha256 of the file as served
#   bundle.pem       intermediate, then root   -> sha256 of the root's DER
#   unrelated.pem    two unrelated roots       -> no chain: sha256 of the file as served
set -euo pipefail
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ca() { # name subject [issuer-name]
    local name=$1 subj=$2 issuer=${3:-}
    openssl ecparam -name prime256v1 -genkey -noout -out "$work/$name.key"
    cat >"$work/$name.ext" <<EXT
basicConstraints=critical,CA:TRUE
keyUsage=critical,keyCertSign,cRLSign
subjectKeyIdentifier=hash
EXT
    if [ -z "$issuer" ]; then
        openssl req -new -x509 -key "$work/$name.key" -subj "$subj" -days 36500 -sha256 \
            -set_serial 1 -extensions v3 -config <(printf '[req]\ndistinguished_name=dn\n[dn]\n[v3]\n'; cat "$work/$name.ext") \
            -out "$work/$name.pem"
    else
        echo "authorityKeyIdentifier=keyid" >>"$work/$name.ext"
        openssl req -new -key "$work/$name.key" -subj "$subj" -out "$work/$name.csr"
        openssl x509 -req -in "$work/$name.csr" -CA "$work/$issuer.pem" -CAkey "$work/$issuer.key" \
            -set_serial 2 -days 36500 -sha256 -extfile "$work/$name.ext" -out "$work/$name.pem"
    fi
}
ca root "/CN=golden root"
ca inter "/CN=golden intermediate" root
ca other "/CN=golden other root"

cp "$work/root.pem" single.pem
sha256sum single.pem | cut -d' ' -f1 >single.sha256

cat "$work/inter.pem" "$work/root.pem" >bundle.pem
openssl x509 -in "$work/root.pem" -outform DER | sha256sum | cut -d' ' -f1 >bundle.sha256

cat "$work/root.pem" "$work/other.pem" >unrelated.pem
sha256sum unrelated.pem | cut -d' ' -f1 >unrelated.sha256
