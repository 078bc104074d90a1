"""A private boot LAN in network namespaces the test creates: a bridge, qemu's tap on it,
and veth links to server namespaces. The host's own interfaces are never touched; every
namespace is deleted afterwards."""

import os
import signal
import subprocess
import uuid

from conftest import ROOT


def sh(*args, check=True):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=30)


class Lab:
    """`lan`: the bridge `br0`, the machines' taps. Each `host(...)` is a namespace with
    one address on the LAN."""

    def __init__(self, subnet="10.77.0"):
        tag = uuid.uuid4().hex[:6]
        self.subnet = subnet
        self.lan = f"osb-{tag}-lan"
        self.namespaces = [self.lan]
        self.procs = []
        sh("ip", "netns", "add", self.lan)
        self.exec(self.lan, "ip", "link", "set", "lo", "up")
        self.exec(self.lan, "ip", "link", "add", "br0", "type", "bridge")
        self.exec(self.lan, "ip", "link", "set", "br0", "up")
        self.tag = tag
        self.taps = 0

    def exec(self, ns, *args, check=True):
        return sh("ip", "netns", "exec", ns, *args, check=check)

    def host(self, name, host_part):
        """A namespace `name` with `eth0` = SUBNET.host_part/24 on the LAN; returns it."""
        ns = f"osb-{self.tag}-{name}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        outside = f"v{self.tag}{name[:4]}"
        sh("ip", "link", "add", outside, "netns", self.lan, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.exec(self.lan, "ip", "link", "set", outside, "master", "br0")
        self.exec(self.lan, "ip", "link", "set", outside, "up")
        self.exec(ns, "ip", "link", "set", "lo", "up")
        self.exec(ns, "ip", "addr", "add", f"{self.subnet}.{host_part}/24", "dev", "eth0")
        self.exec(ns, "ip", "link", "set", "eth0", "up")
        return ns

    def tap(self):
        """A tap device on the bridge for one qemu NIC; returns its name."""
        name = f"tap{self.taps}"
        self.taps += 1
        self.exec(self.lan, "ip", "tuntap", "add", "dev", name, "mode", "tap")
        self.exec(self.lan, "ip", "link", "set", name, "master", "br0")
        self.exec(self.lan, "ip", "link", "set", name, "up")
        return name

    def spawn(self, ns, args, log):
        """Starts `args` in namespace `ns`, output to `log`; stopped by `close`."""
        out = open(log, "wb")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
        self.procs.append((proc, out))
        return proc

    def router_adverts(self, ns, log):
        """IPv6 router advertisements on `ns`'s eth0, so iPXE does not wait for them."""
        return self.spawn(ns, ["/usr/bin/python3", os.path.join(ROOT, "tests", "netboot", "ra.py"), "eth0"], log)

    def close(self):
        for proc, out in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
            out.close()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
