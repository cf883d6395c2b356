#!/bin/sh
# xen-lab selftest, run in both domUs: identity, Xen devices, and a checksummed
# TCP exchange across the dom0 bridge (busybox httpd + wget, both directions).
fail() { echo "SELFTEST FAIL ($LAB_ROLE): $*"; exit 1; }
echo "role=$LAB_ROLE self_domid=$LAB_SELF_DOMID peer_domid=$LAB_PEER_DOMID self_ip=$LAB_SELF_IP peer_ip=$LAB_PEER_IP"
own=$(xenstore-read domid) || fail "xenstore-read domid"
echo "xenstore domid=$own"
[ "$own" = "$LAB_SELF_DOMID" ] || fail "domid mismatch"
[ -n "$LAB_PEER_DOMID" ] && [ "$LAB_PEER_DOMID" != "$LAB_SELF_DOMID" ] || fail "bad peer domid"
for d in evtchn gntdev gntalloc xenbus; do
	[ -c /dev/xen/$d ] || fail "/dev/xen/$d missing"
done
echo "devices: $(ls /dev/xen | tr '\n' ' ')"
[ -f ./payload.txt ] || fail "/lab/payload.txt not copied"

mkdir -p /tmp/srv
dd if=/dev/urandom of=/tmp/srv/data bs=1024 count=2048 2>/dev/null
md5sum /tmp/srv/data | cut -d' ' -f1 > /tmp/srv/data.md5
httpd -p 8000 -h /tmp/srv || fail "httpd"
i=0
until wget -q -O /tmp/peer.md5 "http://$LAB_PEER_IP:8000/data.md5" 2>/dev/null; do
	i=$((i + 1)); [ $i -gt 300 ] && fail "peer server never answered"
	sleep 1
done
wget -q -O /tmp/peer.data "http://$LAB_PEER_IP:8000/data" || fail "fetching peer data"
got=$(md5sum /tmp/peer.data | cut -d' ' -f1)
want=$(cat /tmp/peer.md5)
echo "received $(wc -c < /tmp/peer.data) bytes from $LAB_PEER_IP, md5 $got (peer says $want)"
[ "$got" = "$want" ] || fail "checksum mismatch"
echo "SELFTEST OK ($LAB_ROLE)"
