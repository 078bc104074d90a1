"""Sends IPv6 router advertisements on one interface, once a second, until killed.

iPXE waits ~13 s for IPv6 router discovery when no router answers; an advertisement on
the test LAN ends the wait at once. The test harness sends it (osstream never does).
Usage: python3 ra.py IFACE"""

import socket
import struct
import sys
import time

iface = sys.argv[1]
index = socket.if_nametoindex(iface)
sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
# Type 134 (router advertisement), code 0, checksum (the kernel fills it in), hop limit
# 64, no flags, router lifetime 0 (not a default router), reachable and retrans timers 0.
advert = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 0, 0, 0)
while True:
    try:
        sock.sendto(advert, ("ff02::1", 0, 0, index))
    except OSError:
        pass
    time.sleep(1)
