"""The command line and configuration: clear errors, effective config, start-up checks."""

import json
import os
import socket
import subprocess

from conftest import BINARY, Server


def run(*args, env=None, cwd=None):
    return subprocess.run([BINARY, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def write(tmp_path, text):
    path = tmp_path / "osstream.toml"
    path.write_text(text)
    return str(path)


def test_help_explains_commands_and_sources():
    out = run("--help")
    assert out.returncode == 0
    for word in ("serve", "config", "OSSTREAM_", "osstream.toml"):
        assert word in out.stdout
    assert "--listen" in run("serve", "--help").stdout


def test_config_show_merges_file_env_and_defaults(tmp_path):
    path = write(tmp_path, '[cache.ram]\ncapacity = "2GiB"\n')
    out = run("--config", path, "config", "show", "--json",
              env={"OSSTREAM_NBD__LISTEN": '["127.0.0.1:20000", "unix:/tmp/x.sock"]'})
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert config["cache"]["ram"]["capacity"] == "2GiB"
    assert config["nbd"]["listen"] == ["127.0.0.1:20000", "unix:/tmp/x.sock"]
    assert config["backends"]["images"]["kind"] == "file"
    toml_out = run("--config", path, "config", "show")
    assert 'capacity = "2GiB"' in toml_out.stdout


def test_osstream_toml_in_the_working_directory_is_read(tmp_path):
    (tmp_path / "osstream.toml").write_text('data_dir = "/srv/elsewhere"\n')
    out = run("config", "show", "--json", cwd=tmp_path)
    assert json.loads(out.stdout)["data_dir"] == "/srv/elsewhere"


def test_the_config_file_is_looked_up_flag_then_environment_then_working_folder(tmp_path):
    flag = tmp_path / "flag.toml"
    flag.write_text('data_dir = "/srv/from-flag"\n')
    env_file = tmp_path / "env.toml"
    env_file.write_text('data_dir = "/srv/from-env"\n')
    (tmp_path / "osstream.toml").write_text('data_dir = "/srv/from-cwd"\n')
    env = {"OSSTREAM_CONFIG": str(env_file)}

    def shown(*args, **kw):
        out = run(*args, "config", "show", "--json", cwd=tmp_path, **kw)
        assert out.returncode == 0, out.stderr
        config = json.loads(out.stdout)
        return config["data_dir"], config["config_file"]

    assert shown("--config", str(flag), env=env) == ("/srv/from-flag", str(flag))
    assert shown(env=env) == ("/srv/from-env", str(env_file))
    assert shown() == ("/srv/from-cwd", "osstream.toml")
    text = run("config", "show", cwd=tmp_path, env=env).stdout
    assert text.startswith(f"# read from {env_file} (OSSTREAM_CONFIG)\n"), text
    # A file the environment names must exist, and the error says who named it.
    out = run("config", "show", cwd=tmp_path, env={"OSSTREAM_CONFIG": str(tmp_path / "nope.toml")})
    assert out.returncode == 2 and "nope.toml (OSSTREAM_CONFIG) does not exist" in out.stderr, out.stderr
    # No file at all: the defaults, said so.
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run("config", "show", cwd=empty, env={"OSSTREAM_CONFIG": ""})
    assert out.returncode == 0 and out.stdout.startswith("# read from no configuration file"), out


def test_the_system_config_file_is_read_last(tmp_path):
    """/etc/osstream/osstream.toml, in a private mount namespace whose /etc is a tmpfs (the
    host's /etc is never written)."""
    config = tmp_path / "system.toml"
    config.write_text('data_dir = "/var/lib/osstream"\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    script = (f"mount -t tmpfs none /etc && mkdir /etc/osstream && cp {config} /etc/osstream/osstream.toml && "
              f"cd {empty} && {BINARY} config show --json")
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "OSSTREAM_CONFIG"})
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["data_dir"] == "/var/lib/osstream" and shown["config_file"] == "/etc/osstream/osstream.toml"


def test_admin_commands_never_create_a_catalog_but_init_does(tmp_path):
    out = run("client", "list", cwd=tmp_path, env={"OSSTREAM_CONFIG": ""})
    assert out.returncode == 2
    assert "there is no catalog at ./osstream-data/catalog.db" in out.stderr and "osstream init" in out.stderr, out.stderr
    assert "no configuration file" in out.stderr
    assert not (tmp_path / "osstream-data").exists()
    out = run("init", cwd=tmp_path, env={"OSSTREAM_CONFIG": ""})
    assert out.returncode == 0 and out.stdout.startswith("created the sqlite catalog"), out
    assert (tmp_path / "osstream-data" / "catalog.db").is_file()
    out = run("--json", "init", cwd=tmp_path, env={"OSSTREAM_CONFIG": ""})
    assert json.loads(out.stdout)["created"] is False
    out = run("client", "list", cwd=tmp_path, env={"OSSTREAM_CONFIG": ""})
    assert out.returncode == 0, out.stderr


def test_unknown_key_is_named_with_its_origin(tmp_path):
    out = run("--config", write(tmp_path, '[nbd]\nlisten = ["127.0.0.1:1"]\nlissen = 1\n'), "config", "show")
    assert out.returncode == 2
    assert "lissen" in out.stderr and "listen" in out.stderr and "osstream.toml" in out.stderr
    out = run("config", "show", env={"OSSTREAM_CACHE__RAM__SIZE": "1G"})
    assert out.returncode == 2 and "size" in out.stderr and "capacity" in out.stderr
    # Backend tables are checked by their kind too.
    out = run("--config", write(tmp_path, '[backends.b]\nkind = "s3"\nbucket = "x"\nallow_https = true\n'),
              "config", "show")
    assert out.returncode == 2 and "allow_https" in out.stderr and "allow_http" in out.stderr, out.stderr


def test_config_show_hides_passwords(tmp_path):
    out = run("--config", write(tmp_path, '[catalog]\nurl = "postgres://osstream:hunter2@db:5432/osstream"\n'),
              "config", "show")
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout and "postgres://osstream:<redacted>@db:5432/osstream" in out.stdout


def test_bad_values_are_explained(tmp_path):
    out = run("--config", write(tmp_path, '[cache.ram]\ncapacity = "lots"\n'), "config", "show")
    assert out.returncode == 2 and "lots" in out.stderr
    out = run("--config", write(tmp_path, '[cache.ram]\nblock_size = "3000"\n'), "config", "show")
    assert out.returncode == 2 and "power of two" in out.stderr
    out = run("--config", str(tmp_path / "missing.toml"), "config", "show")
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_unknown_backend_kind_lists_known_kinds(tmp_path):
    path = write(tmp_path, f'data_dir = "{tmp_path}/d"\n[backends.tapes]\nkind = "tape"\n[nbd]\nlisten = ["127.0.0.1:0"]\n')
    out = run("--config", path, "serve")
    assert out.returncode == 2
    assert 'unknown backend kind "tape"' in out.stderr and "known kinds: block, file, nfs, plugin, s3" in out.stderr


def test_backend_with_missing_root_stops_start_up(tmp_path):
    path = write(tmp_path, f'data_dir = "{tmp_path}/d"\n[backends.nas]\nkind = "file"\nroot = "/nonexistent/images"\n'
                           '[nbd]\nlisten = ["127.0.0.1:0"]\n')
    out = run("--config", path, "serve")
    assert out.returncode == 2 and "backend 'nas' cannot list its images" in out.stderr


def test_port_clash_stops_start_up(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write(tmp_path, f'data_dir = "{tmp_path}/d"\n[nbd]\nlisten = ["127.0.0.1:{port}"]\n')
        out = run("--config", path, "serve")
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr


def test_flags_override_file(tmp_path):
    s = Server(tmp_path)
    s.config.write_text(f'data_dir = "{tmp_path}/ignored"\n[nbd]\nlisten = ["127.0.0.1:1"]\n')
    proc = subprocess.Popen([BINARY, "--config", str(s.config), "serve", "--data-dir", str(s.data_dir),
                             "--listen", f"127.0.0.1:{s.port}"], stdout=subprocess.DEVNULL,
                            stderr=open(s.log, "w"))
    s.proc = proc
    s.log_file = open(os.devnull, "w")
    s.wait_ready()
    out = subprocess.run(["nbdinfo", "--size", s.uri("demo")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (s.data_dir / "images" / "demo.img").exists()
    assert s.stop() == 0


def flat_keys(table, prefix=""):
    keys = set()
    for key, value in table.items():
        if isinstance(value, dict):
            keys |= flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_example_config_documents_every_key():
    import tomllib
    from conftest import ROOT
    example_path = os.path.join(ROOT, "examples", "osstream.toml")
    with open(example_path, "rb") as f:
        example = flat_keys(tomllib.load(f))
    out = run("--config", example_path, "config", "show", "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown.pop("config_file") == example_path
    effective = flat_keys(shown)
    commented = {"nbd.default_export", "catalog.url", "nbd.public_address", "nbd.base_exports", "http.public_url", "tftp.backend", "pxe.interface", "pxe.server_ip", "pxe.script_url", "pxe.dhcp.range_start", "pxe.dhcp.range_end", "pxe.dhcp.router", "profile.trace_dir", "nbd.tls_certificate", "nbd.tls_key", "nbd.tls_client_ca", "metrics.listen", "limits.bandwidth", "limits.iops", "cluster.name", "sessions.shared_overlay_dir"}  # optional keys shown commented out
    text = open(example_path).read()
    for key in commented:
        assert f"# {key.split('.')[-1]} =" in text
    assert effective - commented == example - commented, (effective ^ example)


def test_an_empty_postgresql_database_is_no_catalog_until_init(tmp_path, postgres):
    path = write(tmp_path, f'data_dir = "{tmp_path}/d"\n[catalog]\nurl = "{postgres}"\n')
    out = run("--config", path, "client", "list")
    assert out.returncode == 2 and "the PostgreSQL database holds no osstream catalog" in out.stderr, out.stderr
    out = run("--config", path, "init")
    assert out.returncode == 0 and "created the postgres catalog" in out.stdout, out
    assert run("--config", path, "client", "list").returncode == 0


def test_shell_completions_and_manual_pages(tmp_path):
    for shell in ("bash", "zsh", "fish"):
        out = run("completions", shell)
        assert out.returncode == 0 and "vdisk" in out.stdout and "profile" in out.stdout, (shell, out.stderr)
    bash = tmp_path / "osstream.bash"
    bash.write_text(run("completions", "bash").stdout)
    # The script parses, and completes the commands of `osstream vd<TAB>`.
    probe = (f"source {bash}; COMP_WORDS=(osstream vd); COMP_CWORD=1; COMP_LINE='osstream vd'; "
             "COMP_POINT=${#COMP_LINE}; _osstream osstream vd osstream; echo ${COMPREPLY[@]}")
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.split() == ["vdisk"], out
    # Enumerated options complete to their values.
    assert "ram-overflow-disk" in bash.read_text() and "linux-nbd-dracut" in bash.read_text()
    out = run("completions", "tcsh")
    assert out.returncode == 2 and "bash" in out.stderr
    out = run("man", str(tmp_path / "man"))
    assert out.returncode == 0 and "manual pages" in out.stdout, out.stderr
    page = (tmp_path / "man" / "osstream-vdisk-add.1").read_text()
    assert ".TH osstream-vdisk-add 1" in page and r"\-\-backend" in page
    assert (tmp_path / "man" / "osstream.1").is_file() and (tmp_path / "man" / "osstream-init.1").is_file()
