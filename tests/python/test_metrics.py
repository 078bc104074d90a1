"""Prometheus `/metrics`: scraped while real clients (nbdcopy, libnbd, curl) move data,
checked with `promtool check metrics`, and its counters matched against the traffic."""

import re
import shutil
import subprocess
import time
import urllib.request

import nbd
import pytest

from conftest import free_port, random_image

MIB = 1 << 20
MAC = "aa:bb:cc:00:00:01"


def scrape(url):
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return reply.read().decode()


def samples(text):
    """{'name{labels}': value} of every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def value(text, name, **labels):
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if want else name
    return samples(text).get(key)


def promtool(text, tmp_path):
    tool = shutil.which("promtool")
    assert tool, "promtool (Debian package prometheus) is needed; scripts/test.sh installs it"
    out = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def lab(make_server):
    http, metrics = free_port(), free_port()
    s = make_server('[backends.images]\nkind = "file"\nroot = "images"\nwritable = true\n'
                    f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
                    '[sessions]\nram_capacity = "1MiB"\n'
                    '[profile]\nquiet = "500ms"\nmin_bytes = "64KiB"\n'
                    f'[http]\nenabled = true\nlisten = "127.0.0.1:{http}"\nmetrics = true\n'
                    '[nbd]\nbase_exports = false\nlisten = ["127.0.0.1:PORT"]\n', start=False, demo=False)
    random_image(s.images / "deb.img", 16 * MIB, seed=21)
    s.start()
    s.cli("vdisk", "add", "deb", "--backend", "images", "--write-cache", "ram")
    s.cli("client", "add", MAC)
    s.cli("client", "assign", MAC, "deb")
    s.metrics = f"http://127.0.0.1:{metrics}/metrics"
    s.http = f"http://127.0.0.1:{http}"
    return s


def test_counters_follow_real_traffic_and_pass_promtool(lab, tmp_path):
    before = scrape(lab.metrics)
    promtool(before, tmp_path)
    uri = lab.cli("session", "open", MAC, "deb")
    subprocess.run(["nbdcopy", uri, str(tmp_path / "copy.img")], check=True, timeout=120)
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"x" * 65536, 0)
    h.flush()
    live = scrape(lab.metrics)
    promtool(live, tmp_path)
    vd = dict(vdisk="deb", protocol="nbd")
    # nbdcopy read the whole disk; the handle wrote 64 KiB.
    assert value(live, "osstream_read_bytes_total", **vd) >= 16 * MIB
    assert value(live, "osstream_written_bytes_total", **vd) == 65536
    assert value(live, "osstream_attachments", **vd) == 1  # the handle's connection
    assert value(live, "osstream_attaches_total", **vd) >= 2
    reads = value(live, "osstream_read_requests_total", **vd)
    assert reads >= 16 and value(live, "osstream_read_latency_seconds_count", **vd) == reads
    assert value(live, "osstream_read_latency_seconds_bucket", **vd, le="+Inf") == reads
    assert value(live, "osstream_write_latency_seconds_count", **vd) == 1
    assert value(live, "osstream_backend_requests_total", backend="images") > 0
    assert value(live, "osstream_backend_read_bytes_total", backend="images") >= 16 * MIB
    assert value(live, "osstream_cache_misses_total", tier="ram") > 0
    # The session's overlay holds the write, against its 1 MiB RAM limit.
    session = next(k for k in samples(live) if k.startswith("osstream_session_overlay_bytes{") and 'place="ram"' in k)
    assert samples(live)[session] >= 65536 and f'client="{MAC}"' in session, session
    assert value(live, "osstream_session_overlay_ram_limit_bytes") == MIB
    # A full write cache answers ENOSPC, and says so in its counter.
    with pytest.raises(nbd.Error):
        for i in range(32):
            h.pwrite(b"y" * 65536, MIB + i * 65536)
    full = scrape(lab.metrics)
    assert value(full, "osstream_no_space_errors_total", **vd) >= 1
    assert value(full, "osstream_request_errors_total", **vd) >= 1
    h.shutdown()
    time.sleep(0.5)
    after = scrape(lab.metrics)
    assert value(after, "osstream_attachments", **vd) == 0
    # The same text on the HTTP listener (metrics = true there).
    assert "osstream_read_bytes_total" in scrape(lab.http + "/metrics")


def test_a_recorded_boot_shows_in_the_boot_timing_histogram(lab, tmp_path):
    uri = lab.cli("session", "open", MAC, "deb")
    h = nbd.NBD()
    h.connect_uri(uri)
    for block in range(0, 32):
        h.pread(4096, block * 65536)
    # Still connected, quiet: the boot is taken as over when the quiet began.
    deadline = time.time() + 30
    while "boot profile recorded" not in lab.log.read_text():
        assert time.time() < deadline, lab.log.read_text()
        time.sleep(0.1)
    h.shutdown()
    text = scrape(lab.metrics)
    assert value(text, "osstream_boot_seconds_count", vdisk="deb") == 1
    assert value(text, "osstream_profile_boots_recorded_total") == 1
    promtool(text, tmp_path)


def test_only_metrics_is_served_on_the_metrics_listener(lab):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(lab.metrics.replace("/metrics", "/ipxe/x"), timeout=10)
    assert err.value.code == 404


def test_the_http_listener_serves_no_metrics_unless_asked(make_server):
    http = free_port()
    s = make_server(f'[http]\nenabled = true\nlisten = "127.0.0.1:{http}"\n')
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10)
    assert err.value.code == 404
    assert re.search(r"metrics", s.log.read_text()) is None
