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


def test_an_nfs_export_streams_byte_exact(make_server, tmp_path):
    import os
    import socket
    import time
    export = tmp_path / "export"
    (export / "vdisks").mkdir(parents=True)
    (tmp_path / "recov").mkdir()
    raw = export / "vdisks" / "os.img"
    random_image(raw, 12 * MIB + 777, seed=12)
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    nfs_port, mount_port = ports
    (tmp_path / "ganesha.conf").write_text(f"""
NFS_CORE_PARAM {{ Bind_addr=127.0.0.1; NFS_Port={nfs_port}; MNT_Port={mount_port}; Protocols=3;
  Enable_NLM=false; Enable_RQUOTA=false; Enable_UDP=false; Mount_Path_Pseudo=true; }}
NFS_KRB5 {{ Active_krb5=false; }}
NFSV4 {{ Graceless=true; RecoveryBackend=fs; RecoveryRoot={tmp_path}/recov; }}
EXPORT {{ Export_Id=1; Path={export}; Pseudo=/export; Access_Type=RO; Squash=No_Root_Squash;
  SecType=sys; Protocols=3; Transports=TCP; FSAL {{ Name=VFS; }} }}
""")
    if subprocess.run(["pgrep", "-x", "rpcbind"], capture_output=True).returncode != 0:
        os.makedirs("/run/rpcbind", exist_ok=True)
        subprocess.run(["rpcbind", "-w"], check=True)
    ganesha = subprocess.Popen(["ganesha.nfsd", "-F", "-L", str(tmp_path / "ganesha.log"), "-f",
                                str(tmp_path / "ganesha.conf"), "-p", str(tmp_path / "ganesha.pid")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", nfs_port), timeout=0.5).close()
                break
            except OSError:
                assert time.time() < deadline, "ganesha did not start"
                time.sleep(0.1)
        s = make_server(f'[backends.nas]\nkind = "nfs"\nserver = "127.0.0.1"\nexport = "/export"\n'
                        f'folder = "vdisks"\nnfs_port = {nfs_port}\nmount_port = {mount_port}\n', demo=False)
        copy = tmp_path / "copy.img"
        subprocess.run(["nbdcopy", s.uri("os"), str(copy)], check=True)
        assert sha256(copy) == sha256(raw)
        s.stop()
    finally:
        ganesha.kill()
        ganesha.wait()
