"""Storage backends over NBD: a SAN-style block device (a loop device the test attaches)."""

import subprocess

from conftest import random_image, sha256

MIB = 1 << 20


def test_a_block_device_streams_byte_exact_with_o_direct(make_server, tmp_path):
    raw = tmp_path / "lun.raw"
    random_image(raw, 32 * MIB, seed=11)
    dev = subprocess.run(["losetup", "-f", "--show", str(raw)], check=True, capture_output=True, text=True).stdout.strip()
    try:
        s = make_server(f'[backends.san]\nkind = "block"\ndirect = true\ndevices = {{ lun0 = "{dev}" }}\n', demo=False)
        listing = subprocess.run(["nbdinfo", "--list", s.uri()], check=True, capture_output=True, text=True).stdout
        assert "lun0" in listing and "block backend 'san'" in listing
        copy = tmp_path / "copy.img"
        subprocess.run(["nbdcopy", s.uri("lun0"), str(copy)], check=True)
        assert sha256(copy) == sha256(raw)
        subprocess.run(["qemu-img", "compare", s.uri("lun0"), str(raw)], check=True)
        s.stop()
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
