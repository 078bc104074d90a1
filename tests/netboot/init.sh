#!/bin/busybox sh
# /init of the netboot tests' initramfs: what a stock initramfs does for an NBD root,
# in a few lines. It reads the command line osstream's boot script gave the kernel
# (nbdroot=HOST:PORT/EXPORT as Debian's initramfs-tools reads it, systemd.hostname=,
# systemd.machine_id=), connects /dev/nbd0 to the session export, mounts it, prints the
# marker read from the streamed disk, writes a file (the session's overlay takes it) and
# powers off. Every line it prints starts with "netboot:" for the test to grep.
# With /bin/osstream-agent in the initramfs and osstream.agent= on the command line, the
# client agent serves the disk instead (its cache on the virtio disk /dev/vda, if any)
# and nbd-client attaches /dev/nbd0 to the agent's Unix socket.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "netboot: $*" > /dev/console; }
fail() { say "FAILED: $*"; poweroff -f; }
say "init started"
for module in $(cat /lib/modules/load-order); do
  insmod "/lib/modules/$module" 2>/dev/null
done
for word in $(cat /proc/cmdline); do
  case "$word" in
    nbdroot=*) nbdroot="${word#nbdroot=}" ;;
    systemd.hostname=*) host="${word#systemd.hostname=}" ;;
    systemd.machine_id=*) machine_id="${word#systemd.machine_id=}" ;;
    osstream.agent=*) agent_url="${word#osstream.agent=}" ;;
  esac
done
[ -n "${nbdroot:-}" ] || fail "no nbdroot= on the kernel command line"
server="${nbdroot%%:*}"
portpath="${nbdroot#"$server":}"
port="${portpath%%/*}"
export="${portpath#"$port"/}"
say "hostname=${host:-none} machine_id=${machine_id:-none}"
hostname "${host:-unnamed}"
iface=eth0
ip link set lo up
ip link set "$iface" up || fail "no $iface"
cat > /bin/udhcpc.script <<'SCRIPT'
#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}"
    ;;
esac
exit 0
SCRIPT
chmod 755 /bin/udhcpc.script
udhcpc -i "$iface" -n -q -t 5 -s /bin/udhcpc.script >/dev/null 2>&1 || fail "no DHCP lease on $iface"
say "address $(ip -4 -o addr show dev "$iface" | awk '{print $4}')"
if [ -x /bin/osstream-agent ] && [ -n "${agent_url:-}" ]; then
  agent=1
  cache=/run/osstream-cache
  if [ -b /dev/vda ]; then
    mkdir -p /cache
    mount -t ext4 /dev/vda /cache || fail "cannot mount the cache disk"
    cache=/cache/osstream
  fi
  osstream-agent run --cmdline --cache-dir "$cache" --cache-size 96MiB > /run/agent.log 2>&1 &
  agent_pid=$!
  tries=0
  while [ ! -S /run/osstream-agent.sock ]; do
    tries=$((tries + 1))
    [ "$tries" -lt 200 ] && kill -0 "$agent_pid" 2>/dev/null || { cat /run/agent.log > /dev/console; fail "the agent did not start"; }
    usleep 100000
  done
  nbd-client -u /run/osstream-agent.sock /dev/nbd0 -N disk >/dev/null 2>&1 || fail "nbd-client on the agent's socket"
  say "agent serves /dev/nbd0"
else
  nbd-client "$server" "$port" -N "$export" /dev/nbd0 >/dev/null 2>&1 || fail "nbd-client $server $port"
fi
mount -t ext4 /dev/nbd0 /mnt || fail "cannot mount the NBD root"
say "marker=$(cat /mnt/marker.txt)"
if [ -n "${agent:-}" ]; then
  say "booted: $(osstream-agent booted --cmdline 2>&1)"
fi
echo "written by ${host:-unnamed}" > "/mnt/written-by-${host:-unnamed}.txt" || fail "cannot write"
ls /mnt | grep written-by | while read -r f; do say "sees $f"; done
umount /mnt || fail "cannot unmount"
nbd-client -d /dev/nbd0 >/dev/null 2>&1
if [ -n "${agent:-}" ]; then
  kill -TERM "$agent_pid"
  wait "$agent_pid"
  say "agent-stats $(osstream-agent stats --cache-dir "$cache" --json)"
  grep -E "WARN|ERROR" /run/agent.log | while read -r line; do say "agent-log $line"; done
  [ -b /dev/vda ] && umount /cache
fi
say "done"
poweroff -f
